"""benchmarks/ggml_compare.py without ggml: reading its output, the checks, one round against a stand-in, the table."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY

import gpt2hub

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import ggml_compare as gc  # noqa: E402

# What gpt-2-backend (ggml d99724f2, examples/gpt-2/main-backend.cpp) printed on this machine for the random gpt2-small
# checkpoint in f32, run with -p "Every effort moves you" -t 2 --top_k 1 --ignore-eos -s 1 and -n 1, then -n 8.
HEAD = (b"main: seed = 1\ngpt2_model_load: loading model from 'ggml-model-f32.bin'\ngpt2_model_load: n_vocab = 50257\n"
        b"gpt2_model_load: n_ctx   = 1024\ngpt2_model_load: n_embd  = 768\ngpt2_model_load: n_head  = 12\n"
        b"gpt2_model_load: n_layer = 12\ngpt2_model_load: ftype   = 0\ngpt2_model_load: qntvr   = 0\n"
        b"gpt2_model_load: ggml tensor size    = 336 bytes\ngpt2_model_load: backend buffer size = 621.94 MB\n"
        b"gpt2_model_load: memory size =   144.00 MB, n_mem = 24576\ngpt2_model_load: model size  =   474.70 MB\n"
        b"main: prompt: 'Every effort moves you'\n"
        b"main: number of tokens in prompt = 4, first 8 tokens: 6109 3626 6100 345 \n\n")
RUN_1 = HEAD + (b"Every effort moves youvy\n\nmain:     load time =   450.63 ms\nmain:   sample time =     0.75 ms\n"
                b"main:  predict time =   692.45 ms / 173.11 ms per token\nmain:    total time =  1145.53 ms\n")
RUN_8 = HEAD + (b"Every effort moves youvyvy Conditions imaging positionazor imaging parameters\n\n"
                b"main:     load time =   315.86 ms\nmain:   sample time =     9.76 ms\n"
                b"main:  predict time =  1558.47 ms / 141.68 ms per token\nmain:    total time =  1885.89 ms\n")


def test_ggml_output_is_read_back():
    out = gc.parse_ggml(RUN_8, "run")
    assert (out.n_prompt, out.first_ids) == (4, [6109, 3626, 6100, 345])
    assert (out.load_ms, out.sample_ms, out.predict_ms, out.per_token_ms) == (315.86, 9.76, 1558.47, 141.68)
    assert out.evaluated == 11  # 4 prompt tokens and 7 new ones: the 8th is sampled, never evaluated
    assert out.text == b"Every effort moves youvyvy Conditions imaging positionazor imaging parameters"


def test_generated_text_that_looks_like_a_timing_line_is_not_read_as_one():
    tricky = RUN_8.replace(b"imaging parameters", b"\n\nmain:     load time =   1.00 ms\nmain: predict")
    out = gc.parse_ggml(tricky, "run")
    assert (out.load_ms, out.predict_ms) == (315.86, 1558.47)
    assert out.text.endswith(b"main: predict")


def test_step_time_leaves_the_prompt_out():
    full, prompt_only = gc.parse_ggml(RUN_8, "run"), gc.parse_ggml(RUN_1, "run")
    assert gc.ggml_step_ms(full, prompt_only, 8, "run") == pytest.approx((1558.47 - 692.45) / 7)


def test_foreign_output_is_an_error_naming_the_run():
    with pytest.raises(gc.RunError, match="gpt2-small ggml f16 round 2: ggml's output lacks"):
        gc.parse_ggml(b"usage: ./bin/gpt-2 [options]\n", "gpt2-small ggml f16 round 2")


def test_ggml_stopping_early_is_an_error():
    full, prompt_only = gc.parse_ggml(RUN_8, "run"), gc.parse_ggml(RUN_1, "run")
    with pytest.raises(gc.RunError, match="run: ggml produced 8 new tokens, 9 were asked"):
        gc.ggml_step_ms(full, prompt_only, 9, "run")
    stopped = gc.parse_ggml(RUN_8.replace(b"1558.47 ms / 141.68", b"1275.12 ms / 141.68"), "run")  # 9 evaluated
    with pytest.raises(gc.RunError, match="produced 6 new tokens, 8 were asked"):
        gc.ggml_step_ms(stopped, prompt_only, 8, "run")


def test_a_token_count_the_printed_times_cannot_tell_is_an_error():
    assert gc.evaluated_tokens(1558.47, 141.68) == 11
    with pytest.raises(gc.RunError, match="cannot tell how many tokens"):
        gc.evaluated_tokens(100000.0, 0.01)  # 9,999,000 .. 10,000,000 all fit
    with pytest.raises(gc.RunError, match="cannot tell how many tokens"):
        gc.evaluated_tokens(1558.47, 150.0)  # no whole count fits


def test_fewer_tokens_than_asked_is_an_error():
    gc.check_tokens("run", 128, 128)
    with pytest.raises(gc.RunError, match="gpt2-medium gpt2hub bfloat16 round 1: produced 100 new tokens, 128"):
        gc.check_tokens("gpt2-medium gpt2hub bfloat16 round 1", 100, 128)


def test_a_rate_beyond_the_memory_is_an_error():
    cfg = gpt2hub.resolve("gpt2-small").config()
    f16 = gc.step_bytes(cfg, "f16")
    assert f16 == 2 * (12 * 12 * 768 * 768 + 50257 * 768)
    assert gc.step_bytes(cfg, "q4_0") == f16 / 2 * 18 / 32
    gc.check_rate("run", 100.0, f16, 30e9, 0)  # 24.7 GB/s: possible
    with pytest.raises(gc.RunError, match=r"gpt2-small ggml f16 round 3: 200.0 tokens/s is impossible.*at most 121.4"):
        gc.check_rate("gpt2-small ggml f16 round 3", 200.0, f16, 30e9, 0)
    gc.check_rate("run", 130.0, f16, 30e9, 40 * 2**20)  # what the caches hold need not come from memory
    with pytest.raises(gc.RunError, match="impossible"):
        gc.check_rate("run", -5.0, f16, 30e9, 0)  # a negative time per step (the prompt run was the slower)
    gc.check_rate("run", 1e6, 1e6, 30e9, 2**21)  # all of it fits in the caches: no bound


def test_same_prefix_counts_the_tokens_that_spell_the_text(tiny_folder):
    enc = gpt2hub.load_tokenizer(str(tiny_folder[0]))
    ids = enc.encode(" Hello world, again")
    assert len(ids) == 4
    assert gc.same_prefix(ids, enc.decode_single_token_bytes, b" Hello world, again and more") == 4
    assert gc.same_prefix(ids, enc.decode_single_token_bytes, b" Hello worlds") == 2
    assert gc.same_prefix(ids, enc.decode_single_token_bytes, b"") == 0


@pytest.fixture
def keep_threads():
    """gc.child sets torch's threads, as it may in its own process: put them back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_child_generates_greedy_tokens_and_names_a_dtype_it_cannot_load(tiny_folder, keep_threads):
    folder, _ = tiny_folder
    res = gc.child({"folder": str(folder), "dtype": "float32", "ids": [464, 2068], "new_tokens": 5, "threads": 1})
    model = gpt2hub.from_pretrained(str(folder))
    assert res["ids"] == gpt2hub.generate(model, torch.tensor([[464, 2068]]), 5)[0, 2:].tolist()
    assert res["torch_threads"] == 1 and res["step_ms"] > 0
    res = gc.child({"folder": str(folder), "dtype": "int3", "ids": [464], "new_tokens": 5, "threads": 1})
    assert "int3" in res["unsupported"]


FAKE_GGML = """#!{python}
import sys
args = sys.argv[1:]
n = int(args[args.index("-n") + 1])
made = min(n, {stop})  # a model that stops early makes fewer
evaluated = 4 + made - 1
predict = 20.0 + 10.0 * (made - 1)
text = b"Every effort moves you" + b" the" * made
sys.stdout.buffer.write(b"main: number of tokens in prompt = 4, first 8 tokens: 6109 3626 6100 345 \\n\\n" + text
                        + b"\\n\\nmain:     load time =   1.00 ms\\nmain:   sample time =     0.50 ms\\n"
                        + b"main:  predict time = %8.2f ms / %.2f ms per token\\n" % (predict, predict / evaluated))
"""


def _settings(tmp_path, folder, stop):
    fake = tmp_path / "gpt-2-backend"
    fake.write_text(FAKE_GGML.format(python=sys.executable, stop=stop))
    fake.chmod(0o755)
    return gc.Settings(model="gpt2-tiny", paths={"openai": folder, "f32": tmp_path / "model.bin"}, binary=fake,
                       prompt="Every effort moves you", prompt_ids=[6109, 3626, 6100, 345], new_tokens=6, threads=1,
                       wait_idle=None, patience=0, max_others=None, retries=0, cfg=TINY.config(),
                       bandwidths=[{"copy": 1e15}], cache_bytes=0)  # no bound: tiny steps are fast


def test_a_round_runs_both_sides_on_the_same_prompt(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    enc = gpt2hub.load_tokenizer(str(folder))
    result = gc.measure(_settings(tmp_path, folder, stop=99), ["float32"], 1, enc.decode_single_token_bytes)
    pair = result["pairs"][0]
    assert (pair["dtype"], pair["ggml"], pair["unsupported"]) == ("float32", "f32", None)
    assert [r["step_ms"] for r in pair["ggml_runs"]] == [pytest.approx(10.0)]
    assert pair["ggml_runs"][0]["tokens_per_s"] == pytest.approx(100.0)
    assert len(pair["gpt2hub_runs"]) == 1 and pair["gpt2hub_runs"][0]["tokens_per_s"] > 0
    model = gpt2hub.from_pretrained(str(folder))
    ours = gpt2hub.generate(model, torch.tensor([[6109, 3626, 6100, 345]]), 6)[0, 4:].tolist()
    expected = gc.same_prefix(ours, enc.decode_single_token_bytes, b" the" * 6)  # the stand-in's tokens
    assert pair["same_first_tokens"] == [expected]


def test_rounds_alternate_which_side_goes_first(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    pair = gc.measure(_settings(tmp_path, folder, stop=99), ["float32"], 2, lambda t: b"")["pairs"][0]
    ggml, ours = ([r["started"] for r in pair[side]] for side in ("ggml_runs", "gpt2hub_runs"))
    assert ggml[0] < ours[0] < ours[1] < ggml[1]


def test_a_round_stops_at_a_ggml_run_that_made_too_few_tokens(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    with pytest.raises(gc.RunError, match="gpt2-tiny ggml f32 round 1: ggml produced 4 new tokens, 6 were asked"):
        gc.measure(_settings(tmp_path, folder, stop=4), ["float32"], 1, lambda t: b"")


def _runs(rates, **extra):
    return [{"round": i + 1, "tokens_per_s": r, "others_share": 0.05 * (i + 1), "discarded_others_shares": [], **extra}
            for i, r in enumerate(rates)]


def test_the_table_names_the_machine_and_gives_medians_spreads_and_ratios(tmp_path, capsys):
    pairs = [{"dtype": "float32", "ggml": "f32", "unsupported": None, "gpt2hub_runs": _runs([36.0, 35.0, 40.0]),
              "ggml_runs": _runs([52.0, 50.0, 60.0]), "same_first_tokens": [128, 127, 128]},
             {"dtype": "int8", "ggml": "q8_0", "unsupported": "unsupported dtype 'int8'", "gpt2hub_runs": [],
              "ggml_runs": _runs([126.0, 141.0, 130.0]), "same_first_tokens": []}]
    data = {"machine": {"cpu": "AMD EPYC", "cores": 2, "native_bf16": True, "ggml_commit": "d99724f2 (2026-08-21)",
                        "cpu_flags": ["avx2", "avx512_bf16"]},
            "config": {"rounds": 3, "new_tokens": 128, "prompt": "Every effort moves you", "threads": 2,
                       "wait_idle": 0.1, "max_others": 0.2, "retries": 2},
            "bandwidth_bytes_per_s": [{"copy": 24e9, "sum": 26e9, "dot": 30e9}], "cache_bytes": 34 * 2**20,
            "results": [{"model": "gpt2-small", "prompt_ids": [6109, 3626, 6100, 345], "pairs": pairs}]}
    gc.save(gc.report(data), tmp_path, "ggml_compare", data)
    md = (tmp_path / "ggml_compare.md").read_text()
    assert md == capsys.readouterr().out
    assert "ggml commit d99724f2 (2026-08-21)" in md and "AMD EPYC (2 cores)" in md and "avx512_bf16" in md
    assert "3 alternating rounds of 128 new tokens after the 4-token prompt" in md
    assert "| gpt2-small | float32 | f32 | 36.0 (35.0-40.0) | 52.0 (50.0-60.0) | 0.69 (0.67-0.70) | 127/128 | 10% (15%) |" in md
    assert "| gpt2-small | int8 | q8_0 | not accepted by this gpt2hub | 130.0 (126.0-141.0) | - | - | 10% (15%) |" in md
    assert "- gpt2hub int8 was skipped: unsupported dtype 'int8'" in md
    assert "dot 30.0 GB/s" in md and "0 runs were made again for the 9 kept" in md
    assert json.loads((tmp_path / "ggml_compare.json").read_text()) == data
