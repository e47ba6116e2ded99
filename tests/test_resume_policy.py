"""run/resume.py's resolve_run directly: what a run trains with, given its options and the study its folder holds."""

from __future__ import annotations

import pytest

from vmap_sweep.errors import ConfigError
from vmap_sweep.run.resume import RunOptions, StoredRun, check_models_per_batch, resolve_run
from vmap_sweep.study.config import preset
from vmap_sweep.study.settings import RunSettings

STORED = StoredRun(preset("tiny").with_overrides(resolution="4x2", seed=3),
                   RunSettings(device="cpu", micro_batch_size=2, deterministic=True),
                   {"models_per_batch": 4, "share": False})


def test_a_new_study_takes_the_preset_and_the_defaults():
    run = resolve_run(RunOptions(preset="tiny", config={"seed": 5}), None)
    assert run.config == preset("tiny").with_overrides(seed=5)
    assert (run.models_per_batch, run.share, run.device, run.micro_batch_size, run.deterministic) == \
        (8, True, "auto", None, False)


def test_a_resume_with_only_the_folder_takes_everything_from_the_study():
    run = resolve_run(RunOptions(), STORED)
    assert run.config == STORED.config
    assert (run.models_per_batch, run.share, run.device, run.micro_batch_size, run.deterministic) == \
        (4, False, "cpu", 2, True)


def test_options_given_win_where_they_do_not_change_the_config():
    run = resolve_run(RunOptions(config={"seed": 3}, models_per_batch="auto", share=True, device="cuda",
                                 micro_batch_size=1), STORED)
    # run settings given are taken as given: the pipeline refuses those that differ from the study's, naming them
    assert (run.models_per_batch, run.share, run.device, run.micro_batch_size) == ("auto", True, "cuda", 1)
    assert run.deterministic  # left out (there is no --no-deterministic): the study's


def test_an_option_that_changes_the_config_is_refused_naming_it():
    with pytest.raises(ConfigError) as e:
        resolve_run(RunOptions(config={"seed": 4}), STORED, "study")
    assert "seed: 3 -> 4" in str(e.value) and "leave out --seed" in str(e.value) and "new --out" in str(e.value)
    with pytest.raises(ConfigError, match=r'resolution: "4x2" -> "32".*leave out --preset'):
        resolve_run(RunOptions(preset="tiny"), STORED, "study")  # the whole preset replaces the study's config
    with pytest.raises(ConfigError, match=r"--set"):
        resolve_run(RunOptions(fixed={"weight_decay": 0.1}), STORED, "study")


def test_a_bad_option_is_refused_before_the_config_is_compared():
    with pytest.raises(ConfigError, match="--models-per-batch 0"):
        resolve_run(RunOptions(models_per_batch="0", config={"seed": 4}), STORED)
    with pytest.raises(ConfigError, match="--seq-len must be at least 1"):
        resolve_run(RunOptions(config={"seq_len": 0}), STORED)


def test_models_per_batch_is_a_positive_integer_or_auto():
    assert check_models_per_batch("3") == check_models_per_batch(3) == 3 and check_models_per_batch("auto") == "auto"
    for bad in ("0", "-2", "x", {"a": 1}, True):
        with pytest.raises(ConfigError, match="--models-per-batch"):
            check_models_per_batch(bad)
