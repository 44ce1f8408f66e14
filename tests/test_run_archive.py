"""The tracked archive of grid runs (benchmarks.run_archive): a report rewritten on a machine
that lost the runs says what it said where they were made, and nothing is overwritten."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import ablations, budget, grid_finetune, quality, run_archive
from benchmarks.grid_finetune import CACHE, protocol_config, run_backbone
from benchmarks.harness import EVALUATION, GRID_EVALUATION, RUN_RECORD, run_name
from tests.test_bench_report import protocol_record, write_run_dir


def _grid_runs(out, seeds=(0, 1)) -> list[str]:
    """Finished FedMAE and random-init grid runs with their protocol fine-tunes and timings."""
    names = []
    for seed in seeds:
        for algorithm, subsets in (("fedmae", [0.74, 0.76, 0.75]), ("random-init", [0.7] * 3)):
            name = write_run_dir(out, algorithm, "iid", seed, 0.7, GRID_EVALUATION)
            record = protocol_record(algorithm, [a + seed / 100 for a in subsets], 600.0)
            (out / name / CACHE).write_text(json.dumps(record))
            machine = "64 CPU cores (the machine that made it)" if seed else None
            (out / name / RUN_RECORD).write_text(
                json.dumps({"flwr-run-seconds": 130.0, "machine": machine})
            )
            names.append(name)
    return names


def _quality_report(out, docs, capsys) -> tuple[str, str]:
    argv = ["--report-only", "--algorithms", "fedmae", "random-init", "--partitions", "iid",
            "--seeds", "0", "1", "--out", str(out), "--docs", str(docs)]  # fmt: skip
    assert quality.main(argv) == 0
    return (docs / "results.md").read_text(), capsys.readouterr().out


def test_a_report_rewritten_without_the_runs_reads_them_from_the_archive(tmp_path, capsys):
    out, docs = tmp_path / "outputs" / "bench-grid", tmp_path / "docs"
    names = _grid_runs(out)
    made_here, said = _quality_report(out, docs, capsys)
    archive = docs / "data" / "runs" / "bench-grid"
    assert f"archived 4 runs in {archive}" in said
    assert sorted(p.name for p in archive.iterdir()) == sorted(names)
    kept = sorted(str(p.relative_to(archive / names[0])) for p in (archive / names[0]).rglob("*"))
    assert kept == sorted(["summary.json", "metrics.jsonl", "config.yaml", RUN_RECORD, CACHE,
                           "reconstructions", "reconstructions/stage-0.png"])  # fmt: skip
    assert "75.5" in made_here  # the fine-tune column came through (mean of s0 75.0, s1 76.0)
    # the machines are those the runs' records name, not the one writing the page
    assert ("on machine not recorded (2 runs); 64 CPU cores (the machine that made it) (2 runs))"
            in made_here)  # fmt: skip
    assert "it ran for every run, 40 min on the test machine." in made_here

    shutil.rmtree(out)  # the machine that made the runs is gone
    rewritten, said = _quality_report(out, docs, capsys)
    assert f"restored 4 runs from {archive}" in said
    assert "archived" not in said  # nothing changed, nothing rewritten
    assert rewritten == made_here
    assert (docs / "results-reconstructions.png").is_file()


def test_a_report_that_would_drop_runs_its_page_reports_refuses_and_names_them(tmp_path, capsys):
    """A page made where all its runs were, rewritten where some are gone (not archived) or by
    a narrower pass: refused, the page untouched, the runs named; --replace-page writes it."""
    out, docs, archive = tmp_path / "bench-grid", tmp_path / "docs", tmp_path / "tracked"
    names = _grid_runs(out)  # seeds 0 and 1
    argv = ["--report-only", "--algorithms", "fedmae", "random-init", "--partitions", "iid",
            "--out", str(out), "--docs", str(docs), "--archive", str(archive)]  # fmt: skip
    assert quality.main([*argv, "--seeds", "0", "1"]) == 0
    page = (docs / "results.md").read_text()
    assert run_archive.page_runs(docs / "results.md") == sorted(names)
    lost = sorted(n for n in names if n.endswith("-s1"))
    with pytest.raises(SystemExit, match=f"reports 2 runs that this pass would not .*{lost[0]}"):
        quality.main([*argv, "--seeds", "0"])  # a narrower pass
    shutil.rmtree(out)
    for name in lost:  # made on a lost machine before the archive kept them
        shutil.rmtree(archive / name)
    with pytest.raises(SystemExit, match="--replace-page to write the page without them"):
        quality.main([*argv, "--seeds", "0", "1"])
    assert (docs / "results.md").read_text() == page
    assert quality.main([*argv, "--seeds", "0", "1", "--replace-page"]) == 0
    assert run_archive.page_runs(docs / "results.md") == sorted(set(names) - set(lost))
    capsys.readouterr()


def test_the_archive_follows_a_changed_run_and_skips_an_unfinished_one(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    names = _grid_runs(out, seeds=(0,))
    unfinished = out / run_name("fedmae", "iid", 1)
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("a run still going")
    assert run_archive.archive_runs([*names, unfinished.name], out, archive) == names
    assert not (archive / unfinished.name).exists()
    assert run_archive.archive_runs(names, out, archive) == []  # the same files: no write
    record = json.loads((out / names[0] / CACHE).read_text())
    (out / names[0] / CACHE).write_text(json.dumps({**record, "seconds": 1.0}))  # fine-tuned anew
    assert run_archive.archive_runs(names, out, archive) == [names[0]]
    assert json.loads((archive / names[0] / CACHE).read_text())["seconds"] == 1.0


def test_a_run_folder_on_this_machine_is_never_overwritten_by_the_archive(tmp_path):
    out, archive = tmp_path / "out", tmp_path / "archive"
    names = _grid_runs(out, seeds=(0,))
    run_archive.archive_runs(names, out, archive)
    shutil.rmtree(out / names[0])
    (out / names[0]).mkdir()  # the same run started again here, not finished yet
    (out / names[0] / "checkpoint.pt").write_text("partial")
    summary = json.loads((out / names[1] / "summary.json").read_text())
    (out / names[1] / "summary.json").write_text(json.dumps({**summary, "wall-seconds": 7.0}))
    assert run_archive.restore_runs(out, archive) == []
    assert sorted(p.name for p in (out / names[0]).iterdir()) == ["checkpoint.pt"]
    assert json.loads((out / names[1] / "summary.json").read_text())["wall-seconds"] == 7.0
    assert run_archive.restore_runs(out, tmp_path / "no-archive") == []


def test_a_report_with_no_runs_and_no_archive_refuses_rather_than_empty_the_page(tmp_path):
    out, docs = tmp_path / "out", tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("the page as it was")
    argv = ["--report-only", "--out", str(out), "--docs", str(docs)]
    with pytest.raises(SystemExit, match=r"no finished run of this grid in .*out nor in the arch"):
        quality.main(argv)
    with pytest.raises(SystemExit, match=r"no finished run of these budgets .* --report-only"):
        budget.main([*argv, "--budgets", "5x1"])
    assert (docs / "results.md").read_text() == "the page as it was"
    assert not (docs / "budget.md").exists()


def test_the_budget_report_restores_and_archives_its_runs_too(tmp_path, capsys):
    out, docs, archive = tmp_path / "bench-grid", tmp_path / "docs", tmp_path / "tracked"
    for seed in (0, 1):
        changes_by_algorithm = {
            "random-init": None,
            "fedmae": {"rounds-per-stage": 5, "local-epochs": 2},
        }
        for algorithm, changes in changes_by_algorithm.items():
            name = write_run_dir(out, algorithm, "iid", seed, 0.7, GRID_EVALUATION, changes)
            record = protocol_record(algorithm, [0.70 + seed / 100] * 3, 600.0)
            (out / name / CACHE).write_text(json.dumps(record))
    argv = ["--report-only", "--budgets", "5x2", "--seeds", "0", "1", "--out", str(out),
            "--docs", str(docs), "--archive", str(archive)]  # fmt: skip
    assert budget.main(argv) == 0
    made_here = (docs / "budget.md").read_text()
    assert len(list(archive.iterdir())) == 4
    shutil.rmtree(out)
    assert budget.main(argv) == 0
    assert f"restored 4 runs from {archive}" in capsys.readouterr().out
    assert (docs / "budget.md").read_text() == made_here
    assert run_archive.page_runs(docs / "budget.md") == sorted(p.name for p in archive.iterdir())


def test_a_restored_run_says_why_it_cannot_be_fine_tuned_anew(tmp_path, capsys):
    out, archive = tmp_path / "out", tmp_path / "archive"
    names = _grid_runs(out, seeds=(0,))  # fedmae-iid-s0, random-init-iid-s0, both fine-tuned
    run_archive.archive_runs(names, out, archive)
    shutil.rmtree(out)
    run_archive.restore_runs(out, archive)
    fedmae = out / names[0]
    with pytest.raises(FileNotFoundError, match="restored from the tracked archive"):
        run_backbone(fedmae, protocol_config(fedmae))
    # Fine-tuned under this protocol: grid_finetune reports the record, as for a run made here.
    assert grid_finetune.parse_args(["--out", str(out)]).runs == names
    (fedmae / CACHE).unlink()  # ... and not: left out by default, refused when named
    assert grid_finetune.parse_args(["--out", str(out)]).runs == [names[1]]
    assert f"left out 1 runs without a backbone or a fine-tune under this protocol: {names[0]}" in (
        capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        grid_finetune.parse_args(["--out", str(out), "--runs", names[0]])
    assert "have no exported backbone and no fine-tune" in capsys.readouterr().err


def test_the_fine_tune_step_on_a_fresh_clone_reports_the_archived_fine_tunes(tmp_path, capsys):
    """``make bench-quality-finetune`` where outputs/ is empty: grid_finetune restores the
    archive first, reports each run's fine-tune from its record, and the report after it reads
    the same runs (it said "run the grid first" before)."""
    out, docs = tmp_path / "made" / "bench-grid", tmp_path / "docs"
    names = _grid_runs(out)
    archive = run_archive.archive_dir(docs, out)
    run_archive.archive_runs(names, out, archive)
    made, _ = _quality_report(out, docs, capsys)
    fresh = tmp_path / "fresh" / "bench-grid"  # no such folder, as on a fresh clone
    assert grid_finetune.main(["--out", str(fresh), "--docs", str(docs)]) == 0
    said = capsys.readouterr().out
    assert f"restored {len(names)} runs from {archive}" in said
    assert said.count("(cached)") == len(names) and f"{len(names)} runs under {fresh}" in said
    again, _ = _quality_report(fresh, docs, capsys)
    assert again.replace(str(fresh), str(out)) == made
    # Neither folder nor archive: the error says what to run.
    with pytest.raises(SystemExit):
        grid_finetune.parse_args(["--out", str(tmp_path / "none"), "--docs", str(tmp_path)])
    assert "no run folder" in capsys.readouterr().err


def test_an_archived_run_that_does_not_read_is_skipped_named_and_the_rest_restored(
    tmp_path, capsys
):
    out, archive = tmp_path / "out", tmp_path / "archive"
    names = _grid_runs(out)
    run_archive.archive_runs(names, out, archive)
    shutil.rmtree(out)
    (archive / names[0] / "summary.json").write_text('{"stages": [')  # a half-merged file
    config = archive / names[1] / "config.yaml"
    config.write_text(config.read_text().replace("depth: 4", "depth: -4"))
    (archive / names[2] / "metrics.jsonl").write_text("<<<<<<< HEAD\n")
    assert run_archive.restore_runs(out, archive) == [names[3]]
    said = capsys.readouterr().out
    assert "skipped 3 archived runs that do not read" in said
    assert f"{names[0]} (JSONDecodeError: " in said
    assert f"{names[1]} (" in said and "depth" in said
    assert f"{names[2]} (JSONDecodeError: " in said


def test_the_ablation_report_restores_and_archives_its_runs_too(tmp_path, capsys):
    out, docs = tmp_path / "bench", tmp_path / "docs"
    write_run_dir(out, "fedmae", "iid", 0, 0.620, EVALUATION)
    write_run_dir(out, "fedmae", "iid", 1, 0.607, EVALUATION)  # cited for the seed-to-seed spread
    write_run_dir(out, "fedmae", "iid", 0, 0.586, EVALUATION, {"depth": 2})
    argv = ["--report-only", "--factors", "depth", "--out", str(out), "--docs", str(docs)]
    assert ablations.main(argv) == 0
    made_here = (docs / "ablations.md").read_text()
    assert len(list((docs / "data" / "runs" / "bench").iterdir())) == 3
    shutil.rmtree(out)
    assert ablations.main(argv) == 0
    assert "restored 3 runs from" in capsys.readouterr().out
    assert (docs / "ablations.md").read_text() == made_here
    assert run_archive.page_runs(docs / "ablations.md") == [
        "fedmae-iid-s0", "fedmae-iid-s0-depth2", "fedmae-iid-s1"
    ]  # fmt: skip
    shutil.rmtree(out)
    shutil.rmtree(docs / "data")
    with pytest.raises(SystemExit, match="no finished run of these factors"):
        ablations.main(argv)
