"""`import gpt2hub` and the commands that need no model import no PyTorch (its import takes seconds); every public
name still resolves. Speed itself is measured by benchmarks/cli_startup.py, never here."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]

# Runs the command line as `python -m gpt2hub ARGS` does, then reports whether torch was imported along the way.
GUARD = """\
import json, runpy, sys
spec = json.loads(sys.argv[1])
if spec:  # a test model, registered as conftest registers it
    from gpt2hub.registry import ModelSpec, register
    register(ModelSpec(**spec))
sys.argv = ["gpt2hub", *sys.argv[2:]]
try:
    runpy.run_module("gpt2hub", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def _run(args, env_extra=None, spec=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-c", GUARD, json.dumps(spec), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.mark.parametrize("args", [["--help"], ["cache", "list"], ["cache", "list", "--json"], ["--version"],
                                  ["generate", "--help"], ["bench", "--help"]], ids=" ".join)
def test_commands_without_a_model_do_not_import_torch(tmp_path, args):
    report, proc = _run(args, {"GPT2HUB_CACHE": str(tmp_path)})
    assert report["code"] in (0, None), proc.stderr
    assert not report["torch"], f"`gpt2hub {' '.join(args)}` imported torch"


def test_download_does_not_import_torch(hub_env, server):
    report, proc = _run(["download", "gpt2-tiny"], spec=asdict(TINY))
    assert report["code"] in (0, None), proc.stderr
    assert (hub_env / "openai" / "tiny" / "raw" / "model.ckpt.data-00000-of-00001").exists()
    assert not report["torch"], "`gpt2hub download` imported torch"


PROBE = """\
import sys
import gpt2hub
assert "torch" not in sys.modules, "import gpt2hub imported torch"
names = set(dir(gpt2hub))
assert set(gpt2hub.__all__) <= names, set(gpt2hub.__all__) - names
from gpt2hub import from_pretrained, GPTModel, UnknownModelError, __version__
from gpt2hub.generate import GenerationConfig   # importing the submodule binds it on the package...
assert callable(gpt2hub.generate) and gpt2hub.generate.__name__ == "generate", gpt2hub.generate   # ...the function stays
import gpt2hub.generate as g
assert g is gpt2hub.generate
assert gpt2hub.storage.load_safetensors and gpt2hub.kernels.packed_bytes   # submodules by attribute, as when eager
for name in gpt2hub.__all__:
    assert getattr(gpt2hub, name) is not None, name
namespace = {}
exec("from gpt2hub import *", namespace)
assert set(gpt2hub.__all__) <= set(namespace)
try:
    gpt2hub.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("gpt2hub.no_such_name resolved")
print("ok")
"""


def test_the_package_imports_lazily_and_every_public_name_resolves():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_monkeypatched_generate_is_kept(monkeypatch):
    import gpt2hub

    def stand_in(*args, **kwargs):
        return "stand-in"

    monkeypatch.setattr(gpt2hub, "generate", stand_in)
    assert gpt2hub.generate() == "stand-in"
    monkeypatch.undo()
    assert gpt2hub.generate is not stand_in and gpt2hub.generate.__module__ == "gpt2hub.generate"
