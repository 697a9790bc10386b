import os
import subprocess
import sys

import pytest
from conftest import TINY

from gpt2hub.cli import main

DATA = "model.ckpt.data-00000-of-00001"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_download_generate_and_cache_commands(hub_env, server, capsys):
    code, out, _ = run(capsys, "download", "gpt2-tiny")
    assert code == 0 and DATA in out
    code, out, _ = run(capsys, "generate", "--model", "gpt2-tiny", "--max-new-tokens", "8", "Every effort moves you")
    assert code == 0 and out.startswith("Every effort moves you") and len(out) > len("Every effort moves you\n")
    again = run(capsys, "generate", "--model", "gpt2-tiny", "--max-new-tokens", "8", "Every effort moves you")[1]
    assert again == out  # greedy by default
    seeded = [run(capsys, "generate", "--model", "gpt2-tiny", "--temperature", "1.0", "--top-k", "40", "--top-p", "0.9",
                  "--seed", "3", "--max-new-tokens", "8", "Hello")[1] for _ in range(2)]
    assert seeded[0] == seeded[1]
    code, out, _ = run(capsys, "generate", "--model", "gpt2-tiny", "--temperature", "1.0", "--seed", "3",
                       "--num-return-sequences", "3", "--repetition-penalty", "1.3", "--max-new-tokens", "6", "Hello")
    assert code == 0 and [out.count(f"--- {i} ---") for i in (1, 2, 3)] == [1, 1, 1] and out.count("Hello") >= 3
    greedy = run(capsys, "generate", "--model", "gpt2-tiny", "--max-new-tokens", "8", "Every effort moves you")[1]
    cut = greedy.removeprefix("Every effort moves you")[3:6]
    if cut.strip():  # stop at a piece of the greedy continuation: nothing from it on is printed
        stopped = run(capsys, "generate", "--model", "gpt2-tiny", "--max-new-tokens", "8", "--stop", cut,
                      "Every effort moves you")[1]
        assert cut not in stopped.removeprefix("Every effort moves you") and greedy.startswith(stopped.rstrip("\n"))
    code, out, _ = run(capsys, "cache", "list")
    assert code == 0 and "openai" in out and "tiny" in out and "float32" in out and "MiB" in out
    code, out, _ = run(capsys, "cache", "verify")
    assert code == 0 and "openai/tiny: ok" in out


@pytest.mark.parametrize("damaged,digest", [("raw/vocab.bpe", "sha256"), (f"raw/{DATA}", "crc32c"),
                                            ("converted/bfloat16.safetensors", "crc32c")])
def test_verify_finds_damage_and_exits_nonzero(hub_env, server, capsys, damaged, digest):
    from gpt2hub import from_pretrained

    for dtype in ("float32", "bfloat16"):
        from_pretrained("gpt2-tiny", dtype=dtype)
    assert run(capsys, "cache", "verify")[0] == 0
    path = hub_env / "openai/tiny" / damaged
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # same size: only the digest can tell
    path.chmod(0o644)  # the cache keeps its files read-only
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "cache", "verify")
    assert code == 1 and f"{path}: damaged ({digest} differs" in out and "marked: the next load repairs" in err


def test_rm_and_prune(hub_env, server, capsys):
    run(capsys, "download", "gpt2-tiny")
    leftover = hub_env / "openai/tiny/raw" / f"{DATA}.incomplete"
    leftover.write_bytes(b"x" * 1000)
    (hub_env / "locks" / "openai--gone.lock").write_text("")
    code, out, _ = run(capsys, "cache", "prune")
    assert code == 0 and not leftover.exists() and "stale lock" in out
    assert (hub_env / "locks" / "openai--tiny.lock").exists()  # the lock of a cached model stays
    assert (hub_env / "openai/tiny/raw" / DATA).exists()  # complete files are kept
    code, out, _ = run(capsys, "cache", "rm", "gpt2-tiny")
    assert code == 0 and not (hub_env / "openai/tiny").exists()
    assert "not in the cache" in run(capsys, "cache", "rm", "gpt2-tiny")[1]


def test_errors_are_one_line_without_traceback(hub_env, server, capsys, monkeypatch):
    code, _, err = run(capsys, "generate", "--model", "gpt2-smal", "hi")
    assert code == 2 and err.count("\n") == 1 and "Did you mean 'gpt2-small'" in err  # a bad argument: 2
    monkeypatch.setenv("GPT2HUB_OFFLINE", "1")
    code, _, err = run(capsys, "generate", "--model", "gpt2-tiny", "hi")
    assert code == 1 and "gpt2hub download gpt2-tiny" in err and "Traceback" not in err
    monkeypatch.delenv("GPT2HUB_OFFLINE")
    del server.served.files[f"/{TINY.size}/hparams.json"]
    code, _, err = run(capsys, "download", "gpt2-tiny")
    assert code == 1 and "404" in err and "hparams.json" in err


def test_python_dash_m_and_cuda_without_gpu(tmp_path):
    env = {**os.environ, "GPT2HUB_CACHE": str(tmp_path), "GPT2HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "gpt2hub", "cache", "list"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "empty" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "gpt2hub", "generate", "--device", "cuda", "hi"], env=env,
                          capture_output=True, text=True)
    import torch

    if not torch.cuda.is_available():
        assert proc.returncode == 1 and "CUDA" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gpt2hub", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "gpt2hub" in proc.stdout


@pytest.mark.parametrize("argv", [["cache"], ["generate"], ["nonsense"]])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
