import json

import pytest
import torch

from gpt2hub.bench import compare
from gpt2hub.cli import main


def test_bench_command_end_to_end_and_compare(hub_env, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", "gpt2-tiny", "--repeats", "1", "--batch-sizes", "1", "2", "--prompt-lengths", "4",
                 "--new-tokens", "3", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "gpt2hub (eager)" in printed and "transformers" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["weights"] == "synthetic" and res["machine"]["cores"] >= 1 and res["machine"]["torch"]
    (run,) = res["runs"]
    load = run["load"]
    for kind in ("ours", "transformers", "notebook"):
        assert load[kind]["total_s"]["median"] > 0, kind
    assert load["cold"]["download_s"]["median"] > 0 and load["cold"]["convert_s"]["median"] > 0
    assert load["copy"]["total_s"]["median"] > 0
    gens = {(g["impl"], g["batch"]) for g in run["generation"]}
    assert gens == {("gpt2hub (eager)", 1), ("gpt2hub (eager)", 2), ("transformers", 1), ("transformers", 2)}
    assert all(g["tokens_per_s"]["median"] > 0 for g in run["generation"])
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
    from gpt2hub.bench import markdown

    gen = {"impl": "gpt2hub (cuda_graph)", "batch": 2, "prompt": 16, "new_tokens": 8,
           "ttft_s": {"median": 0.01}, "tokens_per_s": {"median": 1000.0}}
    run = {"device": "cuda", "dtype": "bfloat16", "load": {}, "generation": [gen], "weight_bytes": 250e6,
           "copy_bandwidth_bytes_per_s": 4e12}
    res = {"machine": {"gpu": "NVIDIA H200", "cpu": "x", "cores": 16}, "model": "gpt2-small", "weights": "synthetic",
           "runs": [run]}
    # 250 MB read per step, 500 steps/s -> 125 GB/s of 4 TB/s
    assert "| 3% |" in markdown([res]) and "NVIDIA H200" in markdown([res])
