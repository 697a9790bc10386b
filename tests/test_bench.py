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
