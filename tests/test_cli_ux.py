"""The command line's manners: help that says each default once, suggestions for typos, exit statuses the README
promises, a prompt from standard input, Ctrl-C messages that fit what was stopped, `-v download` that says more."""

import importlib
import io
import re

import pytest

import gpt2hub.bench
import gpt2hub.hub
from gpt2hub.bench import BenchConfig
from gpt2hub.cli import DTYPES, bench_config, build_parser, main

HELPS = [["--help"], ["download", "--help"], ["generate", "--help"], ["export", "--help"], ["mirror", "--help"],
         ["cache", "--help"], ["cache", "list", "--help"], ["cache", "verify", "--help"], ["cache", "rm", "--help"],
         ["cache", "prune", "--help"], ["bench", "--help"], ["bench", "compare", "--help"]]


def _help(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> list[str]:
    """Each option's or argument's entry in a help text, its wrapped lines joined."""
    entries: list[str] = []
    for line in text.splitlines():
        if re.match(r"^  \S", line):
            entries.append(line.strip())
        elif entries and line.startswith("    ") and line.strip():
            entries[-1] += " " + line.strip()
        elif not line.strip():
            entries.append("")
    return [e for e in entries if e]


@pytest.mark.parametrize("argv", HELPS, ids=" ".join)
def test_help_says_each_default_once_and_never_none(capsys, argv):
    out = _help(capsys, argv)
    assert "(default: None)" not in out and "(default: False)" not in out and "(default: [" not in out
    for entry in _entries(out):
        assert entry.count("(default") <= 1, entry
    assert "examples:" in out


def test_help_keeps_the_defaults_it_has(capsys):
    out = " ".join(_help(capsys, ["generate", "--help"]).split())
    for said in ("tokens to generate (default: 50)", "greedy (default: 0.0)", "(default: GPT2HUB_CACHE, else",
                 "(default: openai)", "(default: a fresh seed each run)", "(default: gpt2-small)"):
        assert said in out, said


def test_bench_compare_help_has_a_description(capsys):
    out = _help(capsys, ["bench", "compare", "--help"])
    usage, description = out.split("\n\n")[:2]
    assert "merge the results.json files of several machines" in description


@pytest.mark.parametrize("argv,meant", [(["generat", "hi"], "generate"), (["cache", "lst"], "list"),
                                        (["generate", "--dtype", "bfloat", "hi"], "bfloat16"),
                                        (["downlod", "gpt2-small"], "download")])
def test_a_mistyped_choice_gets_a_suggestion(capsys, argv, meant):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"did you mean '{meant}'?" in err, err


def test_a_choice_far_from_any_gets_no_suggestion(capsys):
    with pytest.raises(SystemExit):
        main(["zzzzzz"])
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["generate", "--model", "gpt2-smal", "hi"], ["download", "gpt2-smal"],
                                  ["export", "no-such-model", "out"]])
def test_an_unknown_model_is_a_bad_argument_exit_2(hub_env, capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2hub: error: unknown model") and err.count("\n") == 1


def test_a_failure_is_still_exit_1(hub_env, server, capsys):
    del server.served.files["/tiny/hparams.json"]
    assert main(["download", "gpt2-tiny"]) == 1


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_dash_reads_the_prompt_from_standard_input(hub_env, server, capsys, monkeypatch):
    argv = ["generate", "--model", "gpt2-tiny", "--max-new-tokens", "6"]
    assert main(argv + ["Every effort moves you"]) == 0
    given = capsys.readouterr().out
    _stdin(monkeypatch, b"Every effort moves you\n")  # as `echo ... |` hands it over
    assert main(argv + ["-"]) == 0
    assert capsys.readouterr().out == given
    _stdin(monkeypatch, "Zwei Zeilen,\nüber zwei.".encode())  # several lines and UTF-8 come through as they are
    assert main(argv + ["-"]) == 0
    assert capsys.readouterr().out.startswith("Zwei Zeilen,\nüber zwei.")


@pytest.mark.parametrize("data,said", [(b"", "empty"), (b"\n", "empty"), (b"\xff\xfe bad", "not UTF-8")])
def test_a_bad_prompt_on_standard_input_is_one_line(hub_env, capsys, monkeypatch, data, said):
    _stdin(monkeypatch, data)
    assert main(["generate", "--model", "gpt2-tiny", "-"]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "Traceback" not in err


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_a_download_says_the_partial_files_are_kept(hub_env, capsys, monkeypatch):
    monkeypatch.setattr(gpt2hub.hub, "download_files", _interrupt)
    assert main(["download", "gpt2-small"]) == 130
    assert capsys.readouterr().err == "gpt2hub: interrupted; partial downloads are kept and resume on the next run\n"


def test_ctrl_c_while_generate_loads_the_model_speaks_of_the_download(hub_env, capsys, monkeypatch):
    monkeypatch.setattr(gpt2hub.hub, "from_pretrained", _interrupt)
    assert main(["generate", "hi"]) == 130
    err = capsys.readouterr().err
    assert "while loading gpt2-small" in err and "partial download is kept" in err


def test_ctrl_c_during_generation_says_generation_stopped_not_downloads(capsys, monkeypatch):
    def pieces(*args, **kwargs):
        yield " and"
        raise KeyboardInterrupt

    monkeypatch.setattr(gpt2hub.hub, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(gpt2hub.hub, "load_tokenizer", lambda *a, **k: object())
    # the submodule, not the function `gpt2hub.generate` that shares its name
    monkeypatch.setattr(importlib.import_module("gpt2hub.generate"), "stream_text", pieces)
    assert main(["generate", "hi"]) == 130
    out, err = capsys.readouterr()
    assert out == "hi and\n"  # the text so far, and the shell's prompt on a line of its own
    assert err == "gpt2hub: interrupted; generation stopped\n"


def test_ctrl_c_during_a_bench_says_no_results_were_written(capsys, monkeypatch):
    monkeypatch.setattr(gpt2hub.bench, "run", _interrupt)
    assert main(["bench", "--quick"]) == 130
    assert capsys.readouterr().err == "gpt2hub: interrupted; the benchmark stopped and wrote no results\n"


def test_verbose_download_says_where_what_and_how_long(hub_env, server, capsys):
    assert main(["-v", "download", "gpt2-tiny"]) == 0
    err = capsys.readouterr().err
    assert f"downloading gpt2-tiny (source openai) into the cache at {hub_env}" in err
    assert "model.ckpt.data-00000-of-00001: " in err and re.search(r"7 file\(s\), [\d.]+ MiB, ready in [\d.]+ s", err)
    assert main(["download", "gpt2-tiny"]) == 0
    assert capsys.readouterr().err == ""  # without -v: nothing


def test_bench_quick_asks_for_the_quick_settings_and_options_still_apply():
    quick = bench_config(build_parser().parse_args(["bench", "--quick"]))
    assert quick.quick and quick.batch_sizes == [1] and quick.prompt_lengths == [16] and quick.new_tokens == 16
    assert not quick.cold and not quick.notebook and not quick.plots and quick.transformers
    assert quick.repeats == BenchConfig().repeats and quick.loads == 2 and quick.model == "gpt2-small"
    assert quick.devices == ["cpu"] and quick.dtypes == ["float32"]
    assert bench_config(build_parser().parse_args(["bench", "--quick", "--repeats", "5"])).loads == 5
    mixed = bench_config(build_parser().parse_args(["bench", "--quick", "--batch-sizes", "2", "3", "--dtype",
                                                    "bfloat16", "--no-transformers"]))
    assert mixed.quick and mixed.batch_sizes == [2, 3] and mixed.dtypes == ["bfloat16"] and not mixed.transformers
    assert mixed.prompt_lengths == [16]
    full = bench_config(build_parser().parse_args(["bench"]))
    assert full == BenchConfig()
    assert not bench_config(build_parser().parse_args(["bench", "--no-cold"])).cold


def test_bench_help_states_the_defaults_the_configs_hold(capsys):
    out = " ".join(_help(capsys, ["bench", "--help"]).split())
    full, quick = BenchConfig(), bench_config(build_parser().parse_args(["bench", "--quick"]))
    for option, field in (("batch sizes for generation", "batch_sizes"), ("prompt lengths in tokens", "prompt_lengths"),
                          ("tokens generated per timing", "new_tokens")):
        words = lambda v: " ".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        assert f"{option} (default: {words(getattr(full, field))}; --quick: {words(getattr(quick, field))})" in out


def test_bench_refuses_a_single_new_token(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--new-tokens", "1"])
    assert e.value.code == 2 and "new-tokens" in capsys.readouterr().err


def test_every_dtype_option_offers_the_same_dtypes():
    """Every --dtype offers the registry's dtypes; export those it writes (not int8/int4)."""
    parser = build_parser()
    found = []
    for argv in (["generate", "x"], ["cache", "rm"], ["bench"]):
        for dtype in DTYPES:
            found.append(parser.parse_args(argv + ["--dtype", dtype]).dtype)
    assert len(found) == 3 * len(DTYPES) and set(DTYPES) == {"float32", "bfloat16", "float16", "int8", "int4"}
    for dtype in DTYPES:
        if dtype in ("int8", "int4"):
            with pytest.raises(SystemExit):
                parser.parse_args(["export", "n", "f", "--dtype", dtype])
        else:
            assert parser.parse_args(["export", "n", "f", "--dtype", dtype]).dtype == dtype
