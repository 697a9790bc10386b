"""Every bad input to the command line is one line on stderr, `gpt2hub: error: ...`, with no traceback, and the
cache is left exactly as it was."""

import hashlib

import pytest
import torch

from gpt2hub.cli import main

LONG = "x" * 5000
NO_CUDA = not torch.cuda.is_available()
G = ["generate", "--model", "gpt2-tiny"]

BAD = [  # (argv, environment, what the message must name)
    (G + ["--max-new-tokens", "-1", "hi"], {}, "max-new-tokens"),
    (G + ["--max-new-tokens", "10000000000", "hi"], {}, "max-new-tokens"),
    (G + ["--max-new-tokens", "abc", "hi"], {}, "max-new-tokens"),
    (G + ["--max-new-tokens", "2.5", "hi"], {}, "max-new-tokens"),
    (G + ["--temperature", "nan", "hi"], {}, "temperature"),
    (G + ["--temperature", "inf", "hi"], {}, "temperature"),
    (G + ["--temperature", "-1", "hi"], {}, "temperature"),
    (G + ["--top-k", "-5", "hi"], {}, "top-k"),
    (G + ["--top-k", "1.5", "hi"], {}, "top-k"),
    (G + ["--top-p", "0", "hi"], {}, "top-p"),
    (G + ["--top-p", "1.5", "hi"], {}, "top-p"),
    (G + ["--top-p", "-0.1", "hi"], {}, "top-p"),
    (G + ["--top-p", "nan", "hi"], {}, "top-p"),
    (G + ["--device", "mps", "hi"], {}, "mps"),
    (G + ["--device", "foo", "hi"], {}, "foo"),
    (G + ["--device", "meta", "hi"], {}, "meta"),
    (G + ["--device", "cuda:99", "hi"], {}, "cuda"),
    (G + ["--seed", str(2**70), "hi"], {}, "seed"),
    (G + ["--seed", "-1", "hi"], {}, "seed"),
    (G + ["--dtype", "float8", "hi"], {}, "dtype"),
    (G + ["--source", "s3", "hi"], {}, "source"),
    (G + ["--revision", "v1", "hi"], {}, "revision"),
    (G + [""], {}, "prompt"),
    (G + ["--repetition-penalty", "0", "hi"], {}, "repetition-penalty"),
    (G + ["--repetition-penalty", "nan", "hi"], {}, "repetition-penalty"),
    (G + ["--num-return-sequences", "0", "hi"], {}, "num-return-sequences"),
    (G, {}, "prompt"),
    (["generate", "--model", LONG, "hi"], {}, "model"),
    (["generate", "--model", "", "hi"], {}, "model"),
    (["generate", "--model", "gpt2-smal", "hi"], {}, "gpt2-small"),
    (["generate", "--model", "../../etc", "hi"], {}, "unknown model"),
    (["download"], {}, "name"),
    (["download", "gpt2-smal"], {}, "gpt2-small"),
    (["download", "gpt2-tiny", "--source", "nope"], {}, "source"),
    (["download", "gpt2-tiny"], {"GPT2HUB_LOCK_TIMEOUT": "abc"}, "GPT2HUB_LOCK_TIMEOUT"),
    (["download", "gpt2-tiny"], {"GPT2HUB_LOCK_TIMEOUT": "-1"}, "GPT2HUB_LOCK_TIMEOUT"),
    (["download", "gpt2-tiny", "--force"], {"GPT2HUB_OPENAI_URL": "notaurl"}, "GPT2HUB_OPENAI_URL"),
    (["download", "gpt2-tiny", "--force"], {"GPT2HUB_READ_TIMEOUT": "soon"}, "GPT2HUB_READ_TIMEOUT"),
    (["download", "gpt2-tiny", "--force"], {"GPT2HUB_OFFLINE": "1"}, "GPT2HUB_OFFLINE"),
    (["cache"], {}, "cache"),
    (["cache", "frob"], {}, "frob"),
    (["cache", "rm"], {}, "--all"),
    (["cache", "rm", "gpt2-tiny", "--dtype", "float8"], {}, "dtype"),
    (["cache", "rm", "gpt2-tiny", "--timeout", "-1"], {}, "timeout"),
    (["nonsense"], {}, "nonsense"),
    (["bench", "--batch-sizes", "0"], {}, "batch-sizes"),
    (["bench", "--repeats", "-3"], {}, "repeats"),
    (["bench", "--new-tokens", "x"], {}, "new-tokens"),
    (["bench", "--device", "foo"], {}, "foo"),
    (["bench", "--dtype", "float8"], {}, "dtype"),
    (["--frobnicate", "cache", "list"], {}, "frobnicate"),
    (["generate"], {}, "prompt"),
]
if NO_CUDA:
    BAD += [(G + ["--device", "cuda", "hi"], {}, "CUDA"), (["bench", "--device", "cuda"], {}, "CUDA")]


def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def filled_cache(hub_env, server, capsys):
    assert main(["download", "gpt2-tiny"]) == 0
    capsys.readouterr()
    return hub_env


def test_the_table_has_at_least_forty_bad_inputs():
    assert len(BAD) >= 40


@pytest.mark.parametrize("argv,env,names", BAD, ids=[" ".join(a)[:60] + str(e) for a, e, _ in BAD])
def test_bad_input_is_one_line_without_traceback_and_the_cache_is_unchanged(filled_cache, capsys, monkeypatch, argv,
                                                                           env, names):
    before = _snapshot(filled_cache)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code not in (0, None), (out, err)
    assert err.startswith("gpt2hub: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and names.lower() in err.lower(), err
    assert len(err) < 2000
    assert _snapshot(filled_cache) == before


def test_usage_errors_exit_2_and_failures_exit_1(filled_cache, capsys):
    with pytest.raises(SystemExit) as e:
        main(G + ["--top-k", "-5", "hi"])
    assert e.value.code == 2
    assert main(G + ["--device", "foo", "hi"]) == 1
    assert main(G + [""]) == 2  # a ValueError from the library side of the command


def test_verbose_shows_the_traceback_and_where_the_model_came_from(filled_cache, capsys):
    assert main(["-v", "generate", "--model", "gpt2-tiny", "--max-new-tokens", "2", "hi"]) == 0
    err = capsys.readouterr().err
    assert "loaded gpt2-tiny from" in err and "source openai" in err and "mapped" in err and "checking the cache" in err
    assert main(["-v"] + G + ["--device", "foo", "hi"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("gpt2hub: error:")


def test_every_option_has_help_with_its_default_and_each_command_examples(capsys):
    for argv in (["--help"], ["generate", "--help"], ["download", "--help"], ["cache", "rm", "--help"],
                 ["cache", "list", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        out = capsys.readouterr().out
        assert "examples:" in out, argv
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for option in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--cache-dir", "--revision"):
        assert option in out
    assert "(default: 50)" in out and "(default: 0.0)" in out


def test_cache_dir_works_on_every_command(hub_env, server, capsys, monkeypatch, tmp_path):
    other = tmp_path / "elsewhere"
    monkeypatch.delenv("GPT2HUB_CACHE")
    assert main(["download", "gpt2-tiny", "--cache-dir", str(other)]) == 0
    assert main(["generate", "--model", "gpt2-tiny", "--max-new-tokens", "2", "--cache-dir", str(other), "hi"]) == 0
    assert main(["cache", "list", "--cache-dir", str(other)]) == 0 and "gpt2-tiny" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache-dir", str(other)]) == 0
    assert main(["cache", "prune", "--cache-dir", str(other)]) == 0
    assert main(["cache", "rm", "gpt2-tiny", "--cache-dir", str(other), "-y"]) == 0
    assert not (other / "openai" / "tiny").exists() and not hub_env.exists()
