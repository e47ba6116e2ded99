"""Offline, a Hub model fails at once with the fix (a local model or --preset tiny), not after the Hub client's
~40 s of retries: one plain connection attempt tells first. Online (reachable), the Hub code path is unchanged."""

from __future__ import annotations

import socket
import time

import pytest
from cli_helpers import cli

import vmap_sweep.model.checkpoint as checkpoint
from vmap_sweep.errors import CheckpointError

REAL_PROBE = checkpoint.hub_unreachable  # conftest replaces the module's attribute per test, not this reference


@pytest.fixture
def online_env(monkeypatch, tmp_path):
    import huggingface_hub.constants

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(checkpoint, "_REACHABLE", {})
    monkeypatch.setattr(checkpoint, "hub_unreachable", REAL_PROBE)


def no_network(*args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")


def test_no_network_fails_at_once_naming_the_fix_and_never_asks_the_hub(online_env, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(socket, "create_connection", no_network)
    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, *a, **k: asked.append(a))
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_model("someone/not-cached")
    assert time.perf_counter() - started < 5 and asked == []
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("someone/not-cached: ")
    assert "the Hub can't be reached (huggingface.co:443: Name or service not known)" in msg
    assert "--preset tiny" in msg and "local folder" in msg


def test_the_cli_says_it_in_one_line_with_exit_code_2(online_env, monkeypatch, tmp_path):
    monkeypatch.setattr(socket, "create_connection", no_network)
    result = cli("run", "--model", "someone/not-cached", "--dry-run", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--preset tiny" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "s").exists()


def test_a_reachable_hub_is_asked_as_before(online_env, monkeypatch):
    import huggingface_hub

    class Conn:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Conn())
    asked = []

    def hub_down(self, repo_id, **kwargs):
        asked.append(repo_id)
        raise ConnectionError("hub down")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", hub_down)
    with pytest.raises(CheckpointError, match=r"the Hub can't be reached \(ConnectionError\)"):
        checkpoint.load_model("someone/missing")
    assert asked == ["someone/missing"]


def test_the_probe_runs_once_per_endpoint_and_a_proxy_is_left_to_the_library(online_env, monkeypatch):
    calls = []

    def count(*a, **k):
        calls.append(a)
        no_network()

    monkeypatch.setattr(socket, "create_connection", count)
    assert checkpoint.hub_unreachable() and checkpoint.hub_unreachable()
    assert len(calls) == 1
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.example:8080")
    assert checkpoint.hub_unreachable().startswith("mirror.example:8080: ")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert checkpoint.hub_unreachable() is None  # a direct connection says nothing behind a proxy
