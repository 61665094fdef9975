"""A run that would not fit the disk is refused before training, naming the bytes needed and free."""

from collections import namedtuple

import pytest

from zoo.pipelines import disk
from zoo.pipelines.stages import RecipeConfig
from zoo.resources import config_path


def test_estimate_counts_the_upcycled_size_and_skips_finished_outputs(tmp_path):
    recipe = RecipeConfig.load(config_path("recipes", "micro", ".yaml"))
    sizes = disk.stage_sizes(recipe)
    assert sizes["moe-tune"] > sizes["specialize"] == sizes["pretrain-lm"] > 0  # experts add parameters
    assert sizes["lora"] == sizes["moe-tune"]
    full = disk.estimate_bytes(recipe, tmp_path)
    assert full > sum(sizes.values()) * 4  # outputs alone, before checkpoints
    (tmp_path / "pretrain-lm" / "model").mkdir(parents=True)
    assert disk.estimate_bytes(recipe, tmp_path) < full


def test_a_run_that_does_not_fit_is_refused_naming_both_figures(tmp_path, monkeypatch):
    recipe = RecipeConfig.load(config_path("recipes", "micro", ".yaml"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    need = disk.estimate_bytes(recipe, tmp_path / "run")
    assert 1e6 < need < 1e9  # the micro recipe: megabytes, which a GB figure would print as 0.0
    with pytest.raises(OSError, match=rf"would write about {need / 1e6:.1f} MB under .* but only 1.0 kB are free"):
        disk.check_disk(recipe, tmp_path / "run")
