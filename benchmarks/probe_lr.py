"""Does the linear probe's fixed learning rate rank backbones as a tuned one would?

Runs used to probe with lr 0.1 alone (MAE's head: BatchNorm without affine + linear, SGD,
cosine, ``probe-epochs``). This benchmark takes finished runs' exported backbones and, on each
run's own probe images (``labelled_subsets``: the same seed and sizes the run used), chooses the
lr as runs now do (``tuned_linear_probe``: a validation share held out, the probe at every lr
of a grid trained on the rest, the best on validation kept, retrained on all probe images and
scored once on the test images), beside the old fixed probe (lr 0.1 on all probe images) and
every lr's test score for reference. This measurement made ``probe-lr-grid`` the default.

    .venv/bin/python -m benchmarks.probe_lr --runs outputs/bench-grid/fedmae-iid-s0 ...

Writes ``docs/probe-lr.md`` and ``docs/probe-lr.png`` (and ``<out>/probe-lr.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import DOCS, command_line, machine_line, pyplot, save_figure
from benchmarks.label_efficiency import run_probe_inputs
from fedmae_flwr.evaluation.features import extract_features
from fedmae_flwr.evaluation.linear_probe import linear_probe, tuned_linear_probe

LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
RUN_LR = 0.1  # linear_probe's default: what every run uses


def probe_run(run_dir: Path, lrs: tuple[float, ...], val_fraction: float) -> dict[str, Any]:
    """The lr grid on one run's backbone: validation and test top-1 per lr, the kept lr."""
    cfg, splits, sets, backbone = run_probe_inputs(run_dir)
    probe_f = extract_features(backbone, splits.normalize(sets["probe"].images))
    test_f = extract_features(backbone, splits.normalize(sets["test"].images))
    probe_y, test_y = sets["probe"].labels, sets["test"].labels
    epochs, classes = cfg.eval.probe_epochs, splits.num_classes
    # The choice exactly as a run makes it (probe-lr-grid, probe-val-fraction) ...
    tuned = tuned_linear_probe(probe_f, probe_y, test_f, test_y, classes, epochs, lrs,
                               val_fraction, seed=cfg.seed)  # fmt: skip
    # ... and, to see what it chose from, every lr's probe on all probe images, scored on test.
    per_lr = {}
    for lr in lrs:
        on_test = linear_probe(probe_f, probe_y, test_f, test_y, classes, epochs, lr=lr,
                               seed=cfg.seed)  # fmt: skip
        per_lr[str(lr)] = {"val": tuned.val_accuracy[repr(lr)], "test": on_test.accuracy}
    return {"run": run_dir.name, "seed": cfg.seed, "per-lr": per_lr, "kept-lr": tuned.lr,
            "tuned": tuned.accuracy, "fixed": per_lr[str(RUN_LR)]["test"],
            "probe-images": len(probe_y), "validation-images": round(val_fraction * len(probe_y)),
            "test-images": len(test_y), "epochs": epochs}  # fmt: skip


def report(results: list[dict[str, Any]], command: str, docs: Path, lrs: tuple) -> None:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    docs.mkdir(parents=True, exist_ok=True)
    lines = [
        "# The linear probe's learning rate: fixed against chosen on validation",
        "",
        f"Command: `{command}` ({machine_line()}; {time.strftime('%Y-%m-%d')}).",
        "",
        f"Each run's exported backbone; its own probe images (seeded as the run drew them), "
        f"{results[0]['validation-images']} of them held out for validation; the probe (MAE's "
        f"BatchNorm-without-affine + linear head, SGD, cosine, {results[0]['epochs']} epochs) "
        f"at lr {', '.join(map(str, lrs))}; the lr with the best validation top-1 is kept and "
        f"its probe, trained on all {results[0]['probe-images']} probe images, scored once on "
        f"the run's {results[0]['test-images']} test images. 'fixed' is the run's own probe "
        f"(lr {RUN_LR}). Test top-1 in %.",
        "",
        "| run | "
        + " | ".join(f"lr {lr} val / test" for lr in lrs)
        + " | kept lr | tuned | fixed | tuned - fixed |",
        "|---|" + "---|" * (len(lrs) + 4),
    ]
    for r in results:
        cells = []
        for lr in lrs:
            p = r["per-lr"][str(lr)]
            cells.append(f"{pct(p['val'])} / {pct(p['test'])}")
        lines.append(f"| {r['run']} | " + " | ".join(cells) + f" | {r['kept-lr']} | "
                     f"{pct(r['tuned'])} | {pct(r['fixed'])} | "
                     f"{100 * (r['tuned'] - r['fixed']):+.1f} |")  # fmt: skip
    floors = {r["seed"]: r for r in results if r["run"].startswith("random-init")}
    paired = [(r, floors[r["seed"]]) for r in results
              if not r["run"].startswith("random-init") and r["seed"] in floors]  # fmt: skip
    if paired:
        lines += ["", "Paired with random init of the same seed (backbone − random init, points):",
                  ""]  # fmt: skip
        for r, floor in paired:
            lines.append(
                f"- {r['run']}: fixed lr {100 * (r['fixed'] - floor['fixed']):+.1f}, "
                f"chosen lr {100 * (r['tuned'] - floor['tuned']):+.1f}"
            )
    lines += ["", "![probe-lr.png](probe-lr.png)"]
    (docs / "probe-lr.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in results:
        ax.plot(lrs, [100 * r["per-lr"][str(lr)]["test"] for lr in lrs], "o-", label=r["run"])
    ax.axvline(RUN_LR, color="grey", linestyle=":", label=f"runs' lr {RUN_LR}")
    ax.set_xscale("log")
    ax.set_xlabel("probe learning rate")
    ax.set_ylabel("test top-1 (%)")
    ax.legend(fontsize=7)
    save_figure(fig, docs / "probe-lr.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="run folders with backbone.safetensors and config.yaml")  # fmt: skip
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-probe-lr"))
    parser.add_argument("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    lrs = tuple(sorted(set(args.lrs) | {RUN_LR}))
    torch.set_num_threads(1)
    results = [probe_run(run, lrs, args.val_fraction) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe-lr.json").write_text(json.dumps(results, indent=1))
    report(results, command_line("benchmarks.probe_lr", argv), args.docs, lrs)


if __name__ == "__main__":
    main()
