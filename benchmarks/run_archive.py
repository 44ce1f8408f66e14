"""A tracked copy of each grid run's result files, so that a report outlives the machine it ran on.

The runs live under ``outputs/`` (ignored by git, ~23 MB a grid run with its backbone and
checkpoints), on one machine. When that machine goes, ``--report-only`` has nothing to read and a
grid cannot be extended by a few runs: every run behind docs/results.md would have to be made
again (it happened: the 2026-12 grid's runs were lost with their machine). So the reports keep,
beside the page they write, the few files a report reads of each run (``ARCHIVED``, ~30 kB, and
the last stage's reconstructions, ~50 kB, which the results plot shows):
``<docs>/data/runs/<out folder name>/<run name>/``.

``restore_runs`` copies them back into an out folder that lacks the run, so the unchanged report
code (``finished``, the config check, the fine-tune cache, the plots) reads a restored run as it
reads one made here. A restored run has no backbone: its cached fine-tune is reported, but a
fine-tune under another protocol needs the run made again.
"""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.grid_finetune import CACHE
from benchmarks.harness import RUN_RECORD, finished
from fedmae_flwr.config import load_config_yaml

# What a report reads of a run: its summary, per-round metrics, resolved config (the check that
# a finished run has the asked settings), the harness' timing and the protocol fine-tune.
ARCHIVED = ("summary.json", "metrics.jsonl", "config.yaml", RUN_RECORD, CACHE)
RECONSTRUCTIONS = "reconstructions"


def archive_dir(docs: Path, out_root: Path) -> Path:
    """Where the runs of ``out_root`` are archived for the pages in ``docs``."""
    return docs / "data" / "runs" / out_root.name


def archived_files(run_dir: Path) -> list[Path]:
    """The files of ``run_dir`` that the archive keeps, relative to it, where they exist."""
    names = [Path(name) for name in ARCHIVED if (run_dir / name).is_file()]
    summary = json.loads((run_dir / "summary.json").read_text())
    if stages := summary.get("stages"):
        last = Path(RECONSTRUCTIONS) / f"stage-{len(stages) - 1}.png"
        if (run_dir / last).is_file():
            names.append(last)
    return names


def archive_runs(names: list[str], out_root: Path, archive: Path) -> list[str]:
    """Copy the report's files of each finished run in ``names`` from ``out_root`` into
    ``archive`` where they differ from (or are missing in) the archived copy; returns the runs
    whose archive changed. An unfinished run is skipped: only a finished run is a result."""
    changed = []
    for name in names:
        run_dir = out_root / name
        if not finished(out_root, name):
            continue
        wrote = False
        for rel in archived_files(run_dir):
            target = archive / name / rel
            if target.is_file() and filecmp.cmp(run_dir / rel, target, shallow=False):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / rel, target)
            wrote = True
        if wrote:
            changed.append(name)
    return changed


def archive_problem(source: Path) -> str | None:
    """What is wrong with the archived run in ``source`` (None: it reads as a finished run):
    its summary must be a JSON object, each metrics line JSON, its config a valid run config."""
    try:
        if not isinstance(json.loads((source / "summary.json").read_text()), dict):
            return "summary.json is not a JSON object"
        metrics = source / "metrics.jsonl"
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            json.loads(line)
        load_config_yaml(source / "config.yaml")
    except (OSError, ValueError) as err:  # JSONDecodeError and the config's checks included
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


def restore_runs(out_root: Path, archive: Path) -> list[str]:
    """Copy each archived run into ``out_root`` where ``out_root`` has no folder of that name;
    returns the runs restored. A folder that exists is left alone, finished or not: a run made
    (or being made) on this machine is the source of truth, and mixing its files with the
    archive's would make a run neither of them is. An archived run that does not read (a
    hand-edited or half-merged file) is skipped and named: the report goes on without it."""
    if not archive.is_dir():
        return []
    restored, broken = [], []
    for source in sorted(p for p in archive.iterdir() if (p / "summary.json").is_file()):
        target = out_root / source.name
        if target.exists():
            continue
        if (problem := archive_problem(source)) is not None:
            broken.append(f"{source.name} ({problem})")
            continue
        shutil.copytree(source, target)
        restored.append(source.name)
    if broken:
        print(f"[run-archive] skipped {len(broken)} archived runs that do not read, left out of "
              f"the report: {'; '.join(broken)}", flush=True)  # fmt: skip
    return restored


def add_archive_argument(parser: Any) -> None:
    """``--archive``: where the runs are archived (default ``archive_dir(--docs, --out)``);
    ``--replace-page``: write the page even where it drops runs it reported (``check_page``)."""
    parser.add_argument(
        "--archive",
        type=Path,
        default=None,
        help="tracked copy of the runs' result files (default: <docs>/data/runs/<out name>)",
    )
    parser.add_argument(
        "--replace-page",
        action="store_true",
        help="write the page even where it leaves out runs the page reports now",
    )


# The last line of a page a report writes: the runs behind it, so that a later report can tell
# whether it would drop some (an HTML comment: Markdown viewers do not show it).
PAGE_RUNS = "<!-- runs behind this page: "


def page_runs(page: Path) -> list[str] | None:
    """The runs ``page`` says it reports (None: no such page, or one written without the list)."""
    if not page.is_file():
        return None
    for line in reversed(page.read_text().splitlines()):
        if line.startswith(PAGE_RUNS) and line.endswith(" -->"):
            return line.removeprefix(PAGE_RUNS).removesuffix(" -->").split()
    return None


def check_page(page: Path, names: list[str], args: Any, tag: str) -> None:
    """Refuse to rewrite ``page`` with the runs ``names`` when it reports runs they lack.

    A report writes the runs it finds, in ``--out`` or the archive. Where the page's runs were
    made on another machine and not all archived (docs/results.md's 2026-12 grid), or where a
    narrower pass is asked for (fewer seeds), the new page would silently drop rows. The error
    names the runs and the two ways on: make them again, or ``--replace-page``."""
    lost = sorted(set(page_runs(page) or []) - set(names))
    if not lost or args.replace_page:
        return
    shown = " ".join(lost[:8]) + (f" ... ({len(lost) - 8} more)" if len(lost) > 8 else "")
    raise SystemExit(
        f"[{tag}] {page} reports {len(lost)} runs that this pass would not (not asked for, or "
        f"neither in {args.out} nor in the archive {archive_of(args)}): {shown}. Writing it "
        "would drop them: ask for them (the page's Command line) and make them where they are "
        "missing, or pass --replace-page to write the page without them (git keeps the old one)."
    )


def mark_page(page: Path, names: list[str]) -> None:
    """End ``page`` with the list of the runs behind it (see ``check_page``)."""
    text = page.read_text().rstrip("\n")
    page.write_text(f"{text}\n\n{PAGE_RUNS}{' '.join(sorted(set(names)))} -->\n")


def archive_of(args: Any) -> Path:
    """The archive a parsed command line names (``--archive``, else beside ``--docs``)."""
    return args.archive if args.archive is not None else archive_dir(args.docs, args.out)


def sync(out_root: Path, archive: Path, tag: str) -> list[str]:
    """Restore ``archive`` into ``out_root`` before a report (see the module docstring);
    returns the runs restored, after saying how many."""
    restored = restore_runs(out_root, archive)
    if restored:
        print(f"[{tag}] restored {len(restored)} runs from {archive}")
    return restored


def keep_and_check(names: list[str], args: Any, page: str, tag: str) -> None:
    """After a report's runs are known: archive them (``keep``), then refuse a page that would
    drop runs it reports (``check_page``); the three reports call this before writing."""
    keep(names, args.out, archive_of(args), tag)
    check_page(args.docs / page, names, args, tag)


def keep(names: list[str], out_root: Path, archive: Path, tag: str) -> list[str]:
    """Archive the finished runs in ``names`` after a report; returns those whose copy changed."""
    changed = archive_runs(names, out_root, archive)
    if changed:
        print(f"[{tag}] archived {len(changed)} runs in {archive}")
    return changed


def nothing_to_report(args: Any, tag: str, what: str) -> SystemExit:
    """The error a report raises when it found no finished run of ``what`` (rather than
    overwrite its page with an empty one)."""
    return SystemExit(
        f"[{tag}] no finished run of {what} in {args.out} nor in the archive "
        f"{archive_of(args)}: run it without --report-only"
    )
