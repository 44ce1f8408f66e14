"""Where do the best features sit? A linear probe after every block of each exported backbone.

Loads each run's exported backbone with timm (strict), takes the mean-pooled tokens after every
block (``forward_intermediates``), and trains the run's own linear probe (BatchNorm without
affine + linear head, same images, epochs and seed as the run's final probe) on each. Results
are cached as ``probe-per-block.json`` in the run's folder.

    .venv/bin/python -m benchmarks.feature_depth --runs fedmae-iid-s0 fedavg-mae-iid-s0

Writes ``docs/feature-depth.md`` and ``docs/feature-depth.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.harness import command_line, machine_line, pyplot, save_figure
from benchmarks.label_efficiency import (
    add_backbone_arguments,
    check_backbones,
    run_probe_inputs,
)
from fedmae_flwr.evaluation.downstream import block_features
from fedmae_flwr.evaluation.linear_probe import tuned_linear_probe


def probe_per_block(run_dir: Path) -> list[dict[str, Any]]:
    """The run's linear probe on the features after each block (cached in the run folder)."""
    cache = run_dir / "probe-per-block.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg, splits, sets, backbone = run_probe_inputs(run_dir)
    train_b = block_features(backbone, splits.normalize(sets["probe"].images))
    test_b = block_features(backbone, splits.normalize(sets["test"].images))
    labels, test_labels = sets["probe"].labels, sets["test"].labels
    results = []
    for train_x, test_x in zip(train_b, test_b, strict=True):
        result = tuned_linear_probe(train_x, labels, test_x, test_labels, splits.num_classes,
                                    cfg.eval.probe_epochs, cfg.eval.probe_lrs,
                                    cfg.eval.probe_val_fraction, seed=cfg.seed)  # fmt: skip
        results.append(asdict(result))
    cache.write_text(json.dumps(results, indent=2))
    return results


def write_report(results: dict[str, list[dict]], command: str, docs: Path) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for run, per_block in results.items():
        blocks = range(1, len(per_block) + 1)
        ax.plot(blocks, [100 * r["accuracy"] for r in per_block], marker="o", label=run)
    ax.set(xlabel="features after block", ylabel="linear probe top-1 (%)",
           title="Where the best features sit")  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(fig, docs / "feature-depth.png")
    depth = max(len(v) for v in results.values())
    lines = [
        "# Linear probe after every block",
        "",
        f"Command: `{command}` ({machine_line()}).",
        "",
        "Each backbone is its run's export, loaded with timm (strict). Features: mean-pooled "
        "tokens after block k (before the final norm); probe: the run's own (BatchNorm without "
        "affine + linear head, same images, epochs and seed). Top-1 in %.",
        "",
        "| backbone (run) | " + " | ".join(f"block {k}" for k in range(1, depth + 1)) + " |",
        "|---|" + "---|" * depth,
    ]
    for run, per_block in results.items():
        cells = [f"{100 * r['accuracy']:.1f}" for r in per_block]
        lines.append(f"| {run} | " + " | ".join(cells + ["-"] * (depth - len(cells))) + " |")
    lines += ["", "![feature-depth.png](feature-depth.png)", ""]
    path = docs / "feature-depth.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_arguments(parser)
    args = parser.parse_args(argv)
    check_backbones(parser, args.runs, args.out)
    results = {run: probe_per_block(args.out / run) for run in args.runs}
    for run, per_block in results.items():
        print(
            f"[feature-depth] {run}: " + " ".join(f"{100 * r['accuracy']:.1f}" for r in per_block)
        )
    command = command_line("benchmarks.feature_depth", argv)
    path = write_report(results, command.strip(), args.docs)
    print(f"[feature-depth] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
