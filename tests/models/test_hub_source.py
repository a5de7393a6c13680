"""A hub id resolves through huggingface_hub's cache in ``download_dir`` (offline here)."""

from __future__ import annotations

import os
import shutil

import pytest

from kvflow import SamplingParams
from tiny_models import LLM32 as LLM


def _fake_hub_cache(download_dir: str, repo_id: str, checkpoint_dir: str) -> None:
    """Lays a checkpoint out as huggingface_hub caches a download: refs/main -> snapshot."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(download_dir, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(revision)
    shutil.copytree(checkpoint_dir, os.path.join(repo, "snapshots", revision))


def test_hub_id_from_download_dir_offline(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local = checkpoint("llama")
    _fake_hub_cache(str(tmp_path), "kvflow-tests/tiny-llama", local)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    via_hub = LLM("kvflow-tests/tiny-llama", download_dir=str(tmp_path), max_model_len=128)
    assert via_hub.llm_engine.config.model_config.model.startswith(str(tmp_path))
    want = LLM(local, max_model_len=128).generate("Hello world", params, use_tqdm=False)
    got = via_hub.generate("Hello world", params, use_tqdm=False)
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not a local folder.*HF_HUB_OFFLINE"):
        LLM("kvflow-tests/does-not-exist", download_dir=str(tmp_path))
