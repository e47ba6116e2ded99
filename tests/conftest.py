"""One tiny-model cache for the whole test session, so the model is pretrained once (~11 s), not per module.

A VMAP_SWEEP_CACHE already set (as .ci/run does) is kept; tests of the cache itself point it elsewhere.
"""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def shared_model_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("VMAP_SWEEP_CACHE"):
            mp.setenv("VMAP_SWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "vmap-sweep-cache"))
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        yield os.environ["VMAP_SWEEP_CACHE"]


@pytest.fixture(autouse=True)
def hub_probe_says_reachable(monkeypatch):
    """Tests mock the Hub's answers themselves: the real connection probe (model.checkpoint.hub_unreachable)
    would answer for this machine's network instead. tests/test_offline.py tests the probe."""
    import vmap_sweep.model.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "hub_unreachable", lambda timeout=3.0: None)
