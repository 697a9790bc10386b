import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from factory import real_vocab, tiny_spec, write_openai_folder  # noqa: E402
from server import FileServer  # noqa: E402

import gpt2hub.download  # noqa: E402
from gpt2hub.registry import register  # noqa: E402
from gpt2hub.synthetic import write_hf_folder  # noqa: E402

TINY = register(tiny_spec())
TINY_HP = TINY.hparams()


@pytest.fixture(autouse=True)
def _no_ambient_env(monkeypatch):
    """Tests never inherit the user's cache, mirrors or offline settings."""
    for var in ("GPT2HUB_CACHE", "GPT2HUB_OPENAI_URL", "GPT2HUB_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GPT2HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """OpenAI's seven files for the tiny test model, the checkpoint written by TensorFlow."""
    folder = tmp_path_factory.mktemp("openai") / TINY.size
    weights = write_openai_folder(folder, TINY_HP, seed=1)
    return folder, weights


@pytest.fixture(scope="session")
def hf_folder(tiny_folder, tmp_path_factory):
    """The same weights in the layout of openai-community/gpt2 on the Hugging Face Hub."""
    folder = tmp_path_factory.mktemp("hf")
    write_hf_folder(folder, TINY_HP, tiny_folder[1], real_vocab())
    return folder


@pytest.fixture
def server(tiny_folder, hf_folder):
    srv = FileServer()
    for f in sorted(tiny_folder[0].iterdir()):
        srv.served.files[f"/{TINY.size}/{f.name}"] = f.read_bytes()
    for f in sorted(hf_folder.iterdir()):
        srv.served.files[f"/hf/{TINY.hf_repo}/{f.name}"] = f.read_bytes()
    yield srv
    srv.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Every backoff the downloader asks for (it then does not sleep)."""
    asked: list[float] = []
    monkeypatch.setattr(gpt2hub.download, "time", types.SimpleNamespace(sleep=asked.append))
    return asked


@pytest.fixture
def hub_env(tmp_path, monkeypatch, server):
    """A fresh cache, OpenAI's bucket and the Hugging Face Hub both served from 127.0.0.1."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPT2HUB_CACHE", str(cache))
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", server.url)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return cache


def pytest_configure(config):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    np.set_printoptions(precision=4)
