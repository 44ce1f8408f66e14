"""Print a run's summary.json as a short report; exit 1 when the file is missing or incomplete."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    file = Path(path)
    if not file.is_file():
        print(f"No summary at {file}: the run did not finish.", file=sys.stderr)
        return 1
    s = json.loads(file.read_text())
    print(f"\nRun {s['run-name']}: {s['depth']} blocks, {s['rounds']} rounds, "
          f"{s['wall-seconds']:.0f} s  ({file.parent})")  # fmt: skip
    print("\nHeld-out masked reconstruction (PSNR over masked pixels, dB)")
    print("  blocks  FedMAE  mean-of-visible")
    for st in s["stages"]:
        print(f"  {st['blocks']:>6}  {st['psnr']:6.2f}  {st['trivial-psnr']:6.2f}")
    print("\nDownstream top-1 accuracy (test set)")
    print("  backbone      linear probe    k-NN  fine-tune")
    if skipped := s["downstream"].get("skipped"):
        print(f"  skipped: {skipped}")
    for name, acc in s["linear-probe-accuracy"].items():
        knn, tune = s["knn-accuracy"].get(name), s["finetune-accuracy"].get(name)
        knn_text = f"{knn:6.4f}" if knn is not None else "     -"
        tune_text = f"{tune:9.4f}" if tune is not None else "        -"
        print(f"  {name:<12}  {acc:12.4f}  {knn_text}  {tune_text}")
    c = s["communication"]
    print(f"\nCommunication: {c['bytes-up-total'] / 1e6:.1f} MB up, "
          f"{c['bytes-down-total'] / 1e6:.1f} MB down, {c['prefix-sends']} prefix sends, "
          f"{c['rejected-replies']} rejected replies")  # fmt: skip
    scored = s["linear-probe-accuracy"] or s["downstream"].get("skipped")
    return 0 if s["stages"] and scored else 1


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("summary", help="a run's summary.json (outputs/<run-name>/summary.json)")
    sys.exit(main(parser.parse_args().summary))
