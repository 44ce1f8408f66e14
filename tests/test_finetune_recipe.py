"""benchmarks.finetune_recipe: one fine-tune per recipe appended to its results, then the page."""

from __future__ import annotations

import json

import pytest

from benchmarks import finetune_recipe


def test_each_recipe_is_measured_appended_and_reported(tmp_path, fmnist_dir):
    results, docs = tmp_path / "results.jsonl", tmp_path / "docs"
    recipes = [{"epochs": 1, "head_norm": "batchnorm"}, {"epochs": 1, "head_norm": "none"}]
    argv = ["--labels", "40", "--test-images", "30", "--threads", "1", "--data-path",
            str(fmnist_dir), "--results", str(results), "--docs", str(docs)]  # fmt: skip
    assert finetune_recipe.main([*argv, "--recipes", json.dumps(recipes)]) == 0
    lines = [json.loads(t) for t in results.read_text().splitlines()]
    assert [ln["recipe"] for ln in lines] == recipes
    assert all(0 <= ln["train"] <= 1 and ln["test-images"] == 30 for ln in lines)
    page = (docs / "finetune-recipe.md").read_text()
    assert "head_norm=batchnorm" in page and "head_norm=none" in page
    assert "No recipe measured here trains to ~100 %" in page  # 1 epoch on 40 images
    assert (docs / "finetune-recipe.png").stat().st_size > 0
    # A second call appends; --report-only measures nothing.
    finetune_recipe.main([*argv, "--recipes", json.dumps(recipes[:1])])
    finetune_recipe.main([*argv, "--report-only"])
    assert len(results.read_text().splitlines()) == 3


def test_recipes_must_be_a_list_of_objects(tmp_path):
    with pytest.raises(SystemExit, match="JSON list of objects"):
        finetune_recipe.main(["--recipes", '{"epochs": 1}', "--results", str(tmp_path / "r")])


def test_rows_that_differ_only_in_lr_are_compared_by_lr():
    def row(backbone, test, **recipe):
        return {"backbone": backbone, "recipe": {"epochs": 30, **recipe}, "test": test}

    lines = [row("a", 0.70, lr=1e-3), row("a", 0.72, lr=2e-3), row("a", 0.75, lr=2e-3, epochs=60),
             row("b", 0.80)]  # fmt: skip
    found = finetune_recipe.lr_findings(lines)
    assert len(found) == 2  # backbone a at 30 epochs; the 60-epoch row and b have one lr each
    assert "lr 0.001: 70.0, lr 0.002: 72.0; best at lr 0.002" in found[0]
    assert "pick nothing" in found[1]
    assert finetune_recipe.lr_findings([row("b", 0.8)]) == []
