"""Every ```python block of the README runs as written, against a full-size 124M checkpoint with random weights
served from 127.0.0.1 (the only edits: the repository's path for torch.hub's "path/to/gpt2hub", the gloo backend
and a one-process group for the torch.distributed block, which names NCCL)."""

import re
import socket
import sys
from pathlib import Path

import pytest
import torch
from factory import real_vocab
from server import FileServer

from gpt2hub.registry import resolve
from gpt2hub.synthetic import write_openai_folder

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def _blocks() -> list[tuple[str, str]]:
    """(the section it sits in, code) of every ```python block."""
    text, found = README.read_text(), []
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        section = re.findall(r"^## (.+)$", text[: m.start()], re.M)[-1]
        found.append((section, m.group(1)))
    return found


@pytest.fixture(scope="module")
def small_weights(tmp_path_factory):
    """OpenAI's seven files for gpt2-small, random weights, the real vocabulary."""
    folder = tmp_path_factory.mktemp("small") / "124M"
    write_openai_folder(folder, resolve("gpt2-small"), real_vocab(), seed=3)
    return {f"/124M/{f.name}": f.read_bytes() for f in folder.iterdir()}


@pytest.fixture
def small_hub(small_weights, tmp_path, monkeypatch):
    srv = FileServer()
    srv.served.files.update(small_weights)
    monkeypatch.setenv("GPT2HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", srv.url)
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")  # random weights under the published names
    monkeypatch.chdir(tmp_path)
    yield srv
    srv.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_has_the_blocks_this_test_runs():
    sections = [s for s, _ in _blocks()]
    assert sections == ["Python API", "Quantized weights", "Scaling out", "Migrating from the book's notebook",
                        "Export and serving", "Export and serving"], sections


@pytest.mark.parametrize("index", range(6))
def test_every_python_block_runs_as_written(small_hub, capsys, monkeypatch, index):
    section, code = _blocks()[index]
    code = code.replace('"path/to/gpt2hub"', repr(str(ROOT)))
    if "init_process_group" in code:  # one process, on the CPU: the block itself is unchanged
        code = code.replace('"nccl"', '"gloo"').replace('"gpt2-xl"', '"gpt2-small"')
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            monkeypatch.setenv(key, value)
    scope: dict = {"__name__": "__readme__"}
    monkeypatch.setattr(sys, "argv", ["readme"])
    try:
        exec(compile(code, f"README.md ({section})", "exec"), scope)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    out = capsys.readouterr().out
    if section == "Python API":
        assert out.startswith("Every effort moves you") and len(scope["texts"]) == 2 and scope["out"].shape[1] > 4
    if section == "Quantized weights":
        from gpt2hub.quant import Int4Linear

        assert out.startswith("Every effort moves you") and isinstance(scope["model"].out_head, Int4Linear)
    if section == "Export and serving" and "hf" in scope:
        assert (Path("gpt2-small-hf") / "model.safetensors").exists()
        hf, ours = scope["hf"].transformer.wte.weight, scope["model"].tok_emb.weight
        assert torch.equal(hf.to(torch.bfloat16), ours.to(torch.bfloat16))
    if "gpt" in scope:
        assert Path("model.pth").exists() and Path("gpt2/124M/model.ckpt.data-00000-of-00001").exists()


def test_readme_documents_every_environment_variable():
    text = README.read_text()
    sources = "".join(p.read_text() for p in (ROOT / "gpt2hub").glob("*.py"))
    for var in sorted(set(re.findall(r"GPT2HUB_[A-Z_]+", sources))):
        assert f"`{var}" in text, var
