import functools
import json

import pytest
import torch

from gpt2hub.bench import compare
from gpt2hub.cli import main


@pytest.mark.slow
def test_bench_command_end_to_end_and_compare(hub_env, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", "gpt2-tiny", "--repeats", "2", "--batch-sizes", "1", "2", "--prompt-lengths", "4",
                 "--new-tokens", "3", "--out", str(out)])
    printed, said = capsys.readouterr()
    assert code == 0 and "gpt2hub (eager)" in printed and "transformers" in printed
    # the plan and its estimate come first; the warnings about its own random-weight files do not come at all
    assert said.startswith("gpt2hub bench: gpt2-tiny (random weights") and "estimated time: about" in said
    assert "GPT2HUB_IGNORE_PINS is set" not in said and "warning(s) about the benchmark's own random-weight" in said
    res = json.loads((out / "results.json").read_text())
    assert res["weights"] == "synthetic" and res["machine"]["cores"] >= 1 and res["machine"]["torch"]
    assert all(step["done"] == step["planned"] for step in res["plan"].values()), res["plan"]  # the plan was the run
    (run,) = res["runs"]
    load = run["load"]
    for kind in ("ours", "transformers", "notebook"):
        assert load[kind]["total_s"]["median"] > 0, kind
    assert load["cold"]["download_s"]["median"] > 0 and load["cold"]["convert_s"]["median"] > 0
    assert load["copy"]["total_s"]["median"] > 0
    gens = {(g["impl"], g["batch"]) for g in run["generation"]}
    assert gens == {("gpt2hub (eager)", 1), ("gpt2hub (eager)", 2), ("transformers", 1), ("transformers", 2)}
    assert all(g["produced"] == [3, 3] and len(g["tokens_per_s"]["runs"]) == 2 for g in run["generation"])
    assert run["copy_bandwidth_bytes_per_s"] > 0 and run["weight_bytes"] > 0  # the floor, measured in the same run
    for png in ("load_stages.png", "tokens_per_s.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cpu | float32 |" in (out / "results.md").read_text()
    table = compare([out / "results.json", out / "results.json"], tmp_path / "cmp")
    assert table.count("gpt2hub (eager)") == 4 and (tmp_path / "cmp" / "tokens_per_s.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bench_refuses_cuda_without_a_gpu(capsys):
    assert main(["bench", "--device", "cuda"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_markdown_reports_bandwidth_share_when_the_copy_bandwidth_is_known():
    from gpt2hub.bench import markdown, stats

    gen = {"impl": "gpt2hub (cuda_graph)", "batch": 2, "prompt": 16, "new_tokens": 8,
           "ttft_s": stats([0.01]), "tokens_per_s": stats([1000.0])}
    run = {"device": "cuda", "dtype": "bfloat16", "load": {}, "generation": [gen], "weight_bytes": 250e6,
           "copy_bandwidth_bytes_per_s": 4e12}
    res = {"machine": {"gpu": "NVIDIA H200", "cpu": "x", "cores": 16}, "model": "gpt2-small", "weights": "synthetic",
           "runs": [run]}
    # 250 MB read per step, 500 steps/s -> 125 GB/s of 4 TB/s
    assert "| 3% |" in markdown([res]) and "NVIDIA H200" in markdown([res])


# -- measurements that cannot be right are errors naming the run, never numbers --------------------------------------
def _results(generation, weight_bytes=497_000_000, bandwidth=40e9, load=None):
    run = {"device": "cpu", "dtype": "float32", "load": load or {}, "generation": generation,
           "weight_bytes": weight_bytes, "copy_bandwidth_bytes_per_s": bandwidth}
    return {"machine": {"cpu": "AMD EPYC", "cores": 2}, "model": "gpt2-small", "weights": "synthetic", "runs": [run]}


def _row(impl, tps_runs, batch=4, prompt=512, new_tokens=32, ttft_runs=(0.5, 0.5, 0.5), produced=None):
    from gpt2hub.bench import stats

    row = {"impl": impl, "batch": batch, "prompt": prompt, "new_tokens": new_tokens, "ttft_s": stats(list(ttft_runs)),
           "tokens_per_s": stats(list(tps_runs))}
    if produced is not None:
        row["produced"] = produced
    return row


def test_markdown_refuses_the_impossible_rate_of_the_issue_naming_the_run():
    from gpt2hub.bench import MeasurementError, markdown

    # what results.json held: three runs of transformers at batch 4, prompt 512, two of them 124,000,000,000 tok/s
    rows = [_row("gpt2hub (eager)", [60.0, 61.0, 62.0]), _row("transformers", [17.8, 1.24e11, 1.24e11])]
    with pytest.raises(MeasurementError, match=r"AMD EPYC.*cpu float32, transformers, batch 4, prompt 512, run 2 of 3: "
                                               r"a decoding step took 3.23e-11 s, below the physical floor"):
        markdown([_results(rows)])
    # results written before the copy bandwidth was measured on CPU: the timer's resolution still refuses it
    with pytest.raises(MeasurementError, match=r"transformers, batch 4, prompt 512, run 2 of 3.*timer's resolution"):
        markdown([_results(rows, bandwidth=None)])


def test_a_rate_faster_than_memory_allows_is_refused_though_the_timer_could_see_it():
    from gpt2hub.bench import GENEROUS, MeasurementError, markdown

    # 497 MB read per step at 4x 40 GB/s is 3.1 ms a step: 1000 tok/s at batch 1 would be 1 ms a step
    assert 497e6 / (GENEROUS * 40e9) > 1 / 1000
    with pytest.raises(MeasurementError, match=r"gpt2hub \(eager\), batch 1, prompt 16, run 1 of 3: a decoding step took "
                                               r"0.001 s, below the physical floor of 0.00311 s \(3.11 ms to read the 474 "
                                               r"MiB of weights once at 4x the 40.0 GB/s copy bandwidth"):
        markdown([_results([_row("gpt2hub (eager)", [1000.0, 50.0, 50.0], batch=1, prompt=16)])])


def test_a_first_token_faster_than_one_read_of_the_weights_is_refused():
    from gpt2hub.bench import MeasurementError, markdown

    with pytest.raises(MeasurementError, match=r"run 3 of 3: its first token took 1e-05 s"):
        markdown([_results([_row("transformers", [50.0] * 3, ttft_runs=(0.3, 0.3, 1e-5))])])


def test_a_run_that_made_fewer_tokens_than_asked_is_refused_naming_it():
    from gpt2hub.bench import MeasurementError, markdown

    row = _row("transformers", [50.0] * 3, new_tokens=32, produced=[32, 32, 1])
    with pytest.raises(MeasurementError, match=r"transformers, batch 4, prompt 512, run 3 of 3: produced 1 of the 32"):
        markdown([_results([row])])


def test_a_load_of_no_time_at_all_is_refused():
    from gpt2hub.bench import MeasurementError, markdown, stats

    load = {"ours": {"total_s": stats([0.04, 0.0, 0.05]), "peak_rss_delta_mib": stats([490.0] * 3)}}
    with pytest.raises(MeasurementError, match=r"ours load: total_s of 0.0 s"):
        markdown([_results([_row("gpt2hub (eager)", [60.0] * 3)], load=load)])


def test_markdown_shows_each_median_with_its_spread():
    from gpt2hub.bench import markdown, stats

    load = {"ours": {"total_s": stats([0.040, 0.042, 0.051]), "peak_rss_delta_mib": stats([490.0, 492.0, 500.0])},
            "transformers": {"total_s": stats([0.150, 0.154, 0.160])}}
    rows = [_row("gpt2hub (eager)", [77.0, 78.5, 79.9], batch=1, prompt=16, ttft_runs=(0.030, 0.031, 0.035)),
            _row("transformers", [38.0, 38.5, 40.0], batch=1, prompt=16)]
    table = markdown([_results(rows, load=load)])
    assert "| 0.042 (0.040-0.051) s | 0.154 (0.150-0.160) s | 3.67x |" in table
    assert "| 492 (490-500) MiB |" in table
    assert "| 78.5 (77.0-79.9) | 31.0 (30.0-35.0) ms | 2.04x |" in table
    assert "| 38.5 (38.0-40.0) |" in table


def test_time_run_counts_the_tokens_actually_produced_and_the_check_refuses_a_short_one():
    from gpt2hub.bench import Floor, MeasurementError, check_generation, stats, time_run

    def lazy(idx, n, mark):  # says it made n columns, but only n - 3 came
        for _ in range(n - 3):
            mark()
        return n

    measured = time_run(lazy, None, 8, "cpu")
    assert measured["produced"] == 5
    row = {"impl": "lazy", "batch": 1, "prompt": 4, "new_tokens": 8, "produced": [measured["produced"]],
           "ttft_s": stats([measured["ttft_s"]]), "decode_s": stats([measured["decode_s"]])}
    with pytest.raises(MeasurementError, match="lazy, run 1 of 1: produced 5 of the 8 tokens"):
        check_generation("here, lazy", row, Floor(0, None, 1e-9))

    def nothing(idx, n, mark):
        return 0

    assert time_run(nothing, None, 8, "cpu")["produced"] == 0


def test_the_runners_mark_every_column_of_gpt2hub_and_transformers():
    from factory import hf_reference, random_weights

    from gpt2hub import GPTModel
    from gpt2hub.bench import ours_runner, time_run, transformers_runner
    from gpt2hub.convert import config_from_hparams, openai_state_dict

    hp = {"n_vocab": 300, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 1}
    weights = random_weights(hp, seed=5)
    cfg = config_from_hparams(hp)
    ours = GPTModel.from_state_dict(cfg, openai_state_dict(lambda name: weights["model/" + name], cfg)).eval()
    idx = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    for run in (ours_runner(ours, "eager"), transformers_runner(hf_reference(weights, hp))):
        marks: list[int] = []
        assert run(idx, 6, functools.partial(marks.append, 1)) == 6 and len(marks) == 6
        measured = time_run(run, idx, 6, "cpu")
        assert measured["produced"] == 6 and measured["decode_s"] >= 0 and measured["ttft_s"] >= 0


def test_the_plan_lists_every_step_and_quick_is_planned_under_a_minute():
    from gpt2hub.bench import BenchConfig, plan, quick_config
    from gpt2hub.registry import resolve

    small = resolve("gpt2-small")
    full = plan(BenchConfig(), small, have_hf=True, have_tf=True, synthetic=True)
    kinds = set(full.steps)
    assert {"write", "cold cpu float32", "models cpu float32", "warm ours cpu float32",
            "warm transformers cpu float32", "warm notebook cpu float32"} <= kinds
    assert {f"gen cpu float32 {i} {b} {p}" for i in ("gpt2hub (eager)", "transformers") for b in (1, 4)
            for p in (16, 512)} <= kinds
    quick = plan(quick_config(), small, have_hf=True, have_tf=True, synthetic=True)
    assert not any(k.startswith(("cold", "warm notebook")) for k in quick.steps)
    assert quick.seconds < 60 < full.seconds and quick.seconds < full.seconds / 3
    assert all(line.strip()[0].isdigit() for line in full.lines())


# -- int8 and int4: gpt2hub's quantized weights beside the references at bfloat16 -----------------------------------
@pytest.mark.slow
def test_bench_times_int8_and_int4_beside_transformers_at_bfloat16(hub_env, tmp_path, capsys):
    from math import prod

    from conftest import TINY64

    from gpt2hub import quant
    from gpt2hub.convert import config_from_hparams

    out = tmp_path / "bench"
    code = main(["bench", "--model", TINY64.name, "--dtype", "int8", "int4", "--repeats", "1", "--batch-sizes", "1",
                 "--prompt-lengths", "4", "--new-tokens", "3", "--no-notebook", "--no-plots", "--out", str(out)])
    printed, said = capsys.readouterr()
    assert code == 0, said
    assert "warm load by transformers (at bfloat16: it has no int4) in a fresh process, cpu int4" in said
    res = json.loads((out / "results.json").read_text())
    assert all(step["done"] == step["planned"] for step in res["plan"].values()), res["plan"]
    int8, int4 = res["runs"]
    for run in (int8, int4):
        assert run["reference_dtype"] == "bfloat16"
        load = run["load"]  # the cold load quantizes ("convert"); transformers loads its bfloat16 weights
        assert load["cold"]["convert_s"]["median"] > 0 and load["transformers"]["total_s"]["median"] > 0
        read = {g["impl"]: g["weight_bytes"] for g in run["generation"]}
        assert all(g["produced"] == [3] for g in run["generation"]) and len(read) == 2
        # the bytes of the floor and of "bandwidth used": exactly the stored codes, scales and bfloat16 rest; and
        # transformers' own bfloat16 weights for its rows
        layout = quant.stored_layout(config_from_hparams(TINY64.hparams()), run["dtype"])
        assert read["gpt2hub (eager)"] == run["weight_bytes"] == sum(t.itemsize * prod(s) for t, s in layout.values())
        assert read["transformers"] == TINY64.n_params * 2
    # (this narrow model is mostly its embedding, which quantized models keep in bfloat16 beside a quantized head)
    assert int4["weight_bytes"] < int8["weight_bytes"]
    table = (out / "results.md").read_text()
    assert "| cpu | int4 | transformers at bfloat16 | 1 | 4 |" in table and "| cpu | int8 | gpt2hub (eager) | 1 | 4 |" in table
    assert " s at bfloat16 |" in table and "int4 and int8: transformers and the notebook path have no such weights" in table
    assert printed.startswith(table)


def _quantized_results(tps_ours, tps_hf, ours_bytes=130_000_000, hf_bytes=250_000_000):
    rows = [{**_row("gpt2hub (eager)", tps_ours, batch=1, prompt=16), "weight_bytes": ours_bytes},
            {**_row("transformers", tps_hf, batch=1, prompt=16), "weight_bytes": hf_bytes}]
    res = _results(rows, weight_bytes=ours_bytes, bandwidth=20e9)
    res["runs"][0].update(dtype="int8", reference_dtype="bfloat16")
    return res


def test_markdown_of_a_quantized_run_names_the_references_dtype_and_each_rows_own_bytes():
    from gpt2hub.bench import markdown, stats

    res = _quantized_results([100.0] * 3, [40.0] * 3)
    res["runs"][0]["load"] = {"ours": {"total_s": stats([0.5])}, "transformers": {"total_s": stats([1.0])}}
    table = markdown([res])
    # 130 MB x 100 steps/s of 20 GB/s is 65%; transformers' 250 MB x 40 steps/s is 50%
    assert "| cpu | int8 | gpt2hub (eager) | 1 | 16 | 100.0 (100.0-100.0) |" in table and "| 2.50x | 65% |" in table
    assert "| cpu | int8 | transformers at bfloat16 | 1 | 16 | 40.0 (40.0-40.0) |" in table and "|  | 50% |" in table
    assert "| 0.500 s | 1.000 s at bfloat16 | 2.00x | - |" in table
    assert "int8: transformers and the notebook path have no such weights, so beside them they ran at bfloat16" in table
    plain = _results([_row("transformers", [40.0] * 3, batch=1, prompt=16)], weight_bytes=250_000_000, bandwidth=20e9)
    assert "at bfloat16" not in markdown([plain]) and "no such weights" not in markdown([plain])


def test_each_generation_row_is_held_to_the_floor_of_its_own_weights():
    from gpt2hub.bench import GENEROUS, MeasurementError, markdown

    # a step of 2.5 ms: possible for 130 MB of int8 weights at 4x 20 GB/s (1.6 ms), not for 250 MB of bfloat16 (3.1 ms)
    assert 130e6 / (GENEROUS * 20e9) < 1 / 400 < 250e6 / (GENEROUS * 20e9)
    markdown([_quantized_results([400.0] * 3, [40.0] * 3)])
    with pytest.raises(MeasurementError, match=r"cpu int8, transformers, batch 1, prompt 16, run 1 of 3: a decoding "
                                               r"step took 0.0025 s, below the physical floor of 0.00313 s.*238 MiB"):
        markdown([_quantized_results([40.0] * 3, [400.0] * 3)])


def test_model_bytes_counts_what_a_model_holds_once():
    from conftest import TINY64

    from gpt2hub import GPTModel, quant
    from gpt2hub.bench import model_bytes
    from gpt2hub.convert import config_from_hparams

    cfg = config_from_hparams(TINY64.hparams())
    plain = GPTModel(cfg).eval()
    assert model_bytes(plain) == (TINY64.n_params + cfg["vocab_size"] * cfg["emb_dim"]) * 4  # the book's own head
    plain.out_head.weight = plain.tok_emb.weight
    assert model_bytes(plain) == TINY64.n_params * 4  # a tied head is the embedding: once
    sd = {k: v.detach() for k, v in plain.state_dict().items()}
    for scheme, head in (("int8", None), ("int4", None), ("int8", "tied")):
        stored = quant.quantize_state_dict(sd, scheme, head=head)
        model = quant.quantized_model(cfg, stored, scheme, head=head)
        assert model_bytes(model) == sum(t.numel() * t.element_size() for t in stored.values()), (scheme, head)
    assert model_bytes(model) < model_bytes(quant.quantized_model(cfg, quant.quantize_state_dict(sd, "int8"), "int8"))


def test_the_plan_of_int8_and_int4_counts_quantizing_and_says_the_references_dtype():
    from gpt2hub.bench import plan, quick_config
    from gpt2hub.registry import resolve

    small = resolve("gpt2-small")
    p = plan(quick_config(dtypes=["float32", "int8", "q4"]), small, have_hf=True, have_tf=False, synthetic=True)
    models = {d: p.steps[f"models cpu {d}"][2] for d in ("float32", "int8", "q4")}
    assert models["float32"] < models["int8"] < models["q4"]  # quantizing once into the fresh cache
    gen = {d: p.steps[f"gen cpu {d} gpt2hub (eager) 1 16"][2] for d in ("float32", "int8", "q4")}
    assert gen["q4"] < gen["int8"] < gen["float32"]
    assert p.steps["gen cpu int8 transformers 1 16"][2] == p.steps["gen cpu float32 transformers 1 16"][2]
    lines = "\n".join(p.lines())
    assert "warm load by transformers (at bfloat16: it has no int4) in a fresh process, cpu q4" in lines
    assert "warm load by transformers in a fresh process, cpu float32" in lines


def test_cold_load_benchmark_takes_every_dtype_of_the_registry(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import cold_load

    from gpt2hub.registry import dtype_choices

    assert cold_load.parser().parse_args(["--dtype", "int8", "int4"]).dtype == ["int8", "int4"]
    assert cold_load.parser().parse_args(["--dtype", *dtype_choices()]).dtype == dtype_choices()
    with pytest.raises(SystemExit):
        cold_load.parser().parse_args(["--dtype", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


@pytest.mark.slow
def test_cold_load_benchmark_quantizes_int8_cold_and_loads_it_warm(hub_env, tmp_path):
    import sys
    from pathlib import Path

    from conftest import TINY64

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import cold_load

    result = cold_load.measure(TINY64.name, "int8", {"this": cold_load.HERE}, 1, tmp_path)
    this = result["this"]
    assert this["convert_s"] > 0 and this["load_s"] > 0 and result["copy_s"] > 0  # "convert": the quantizing
    assert this["warm"]["total_s"]["median"] > 0
    lines = cold_load.report([result], {"this": cold_load.HERE}, {"cpu": "x", "cores": 2, "native_bf16": True}, 1)
    assert any(line.startswith(f"| {TINY64.name} | int8 | this |") for line in lines)
