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
