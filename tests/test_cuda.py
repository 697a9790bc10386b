"""CUDA checks, run on the device machine by benchmarks/gpu_check.sh (CI has no GPU and deselects them)."""

import resource

import pytest
import torch
from factory import hf_tensors, random_weights

from gpt2hub import GPTModel, from_pretrained, generate, state_dict_from_hf
from gpt2hub.convert import config_from_hparams

pytestmark = pytest.mark.cuda
HP = {"n_vocab": 2000, "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 3}


@pytest.fixture(scope="module")
def model():
    assert torch.cuda.is_available(), "these tests need a CUDA GPU"
    cfg = config_from_hparams(HP)
    tensors = {k: torch.from_numpy(v) for k, v in hf_tensors(random_weights(HP, seed=4, scale=0.3)).items()}
    return GPTModel.from_state_dict(cfg, state_dict_from_hf(tensors, cfg)).to("cuda")


@pytest.mark.parametrize("b,t", [(1, 1), (1, 17), (4, 9), (16, 64)])
def test_cuda_graph_greedy_equals_eager_and_cpu(model, b, t):
    idx = torch.randint(0, HP["n_vocab"], (b, t), generator=torch.Generator().manual_seed(b * t)).cuda()
    graph = generate(model, idx, 40, decode="cuda_graph")
    assert torch.equal(graph, generate(model, idx, 40, decode="eager"))
    assert torch.equal(graph, generate(model, idx, 40, use_cache=False))
    cpu = GPTModel.from_state_dict(model.cfg, {k: v.cpu() for k, v in model.state_dict().items()
                                               if k != "out_head.weight"})
    assert torch.equal(graph.cpu(), generate(cpu, idx.cpu(), 40))


def test_cuda_graph_window_slide_and_eos(model):
    idx = torch.randint(0, HP["n_vocab"], (3, 120), generator=torch.Generator().manual_seed(1)).cuda()
    a = generate(model, idx, 30, decode="cuda_graph")  # runs past the 128-token window
    assert torch.equal(a, generate(model, idx, 30, use_cache=False))
    eos = int(a[1, 125])
    b = generate(model, idx, 30, eos_id=eos, decode="cuda_graph")
    assert torch.equal(b, generate(model, idx, 30, eos_id=eos, decode="eager"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda_is_close(model, dtype):
    half = GPTModel.from_state_dict(model.cfg, {k: v.to(dtype) for k, v in model.state_dict().items()
                                                if k != "out_head.weight"})
    idx = torch.randint(0, HP["n_vocab"], (2, 50), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        a, ref = half(idx).float(), model(idx)
    assert (a - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(generate(half, idx, 20, decode="cuda_graph"), generate(half, idx, 20, decode="eager"))


@pytest.fixture
def synthetic_hub(tmp_path, monkeypatch):
    """The tiny model served from 127.0.0.1, written by gpt2hub's own checkpoint writer (no TensorFlow there)."""
    from conftest import TINY
    from factory import real_vocab
    from server import FileServer

    from gpt2hub.synthetic import write_openai_folder

    folder = tmp_path / "served" / TINY.size
    write_openai_folder(folder, TINY, vocab=real_vocab())
    srv = FileServer()
    for f in folder.iterdir():
        srv.served.files[f"/{TINY.size}/{f.name}"] = f.read_bytes()
    monkeypatch.setenv("GPT2HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", srv.url)
    yield srv
    srv.close()


def test_from_pretrained_straight_to_cuda(synthetic_hub):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = from_pretrained("gpt2-tiny", device="cuda", dtype="bfloat16")
    assert model.tok_emb.weight.is_cuda and model.tok_emb.weight.dtype == torch.bfloat16 and model.tied
    again = from_pretrained("gpt2-tiny", device="cuda", dtype="bfloat16")
    with torch.no_grad():
        x = torch.arange(10, device="cuda")[None]
        assert torch.equal(model(x), again(x))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2_000_000  # KiB: no runaway host copies


def test_float32_from_the_mapped_checkpoint_to_cuda(synthetic_hub):
    cpu = from_pretrained("gpt2-tiny")
    gpu = from_pretrained("gpt2-tiny", device="cuda")
    assert gpu.tok_emb.weight.is_cuda and gpu.tok_emb.weight.dtype == torch.float32 and gpu.tied
    assert gpu.trf_blocks[0].att.fused_qkv() is not None  # each published tensor crossed whole: c_attn stays one
    x = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_weights_decode_the_same_tokens_with_and_without_a_cuda_graph(scheme):
    from gpt2hub import quant

    cfg = config_from_hparams(HP)
    tensors = {k: torch.from_numpy(v) for k, v in hf_tensors(random_weights(HP, seed=5, scale=0.3)).items()}
    sd = GPTModel.from_state_dict(cfg, state_dict_from_hf(tensors, cfg)).state_dict()
    model = quant.quantized_model(cfg, {k: v.cuda() for k, v in quant.quantize_state_dict(sd, scheme).items()}, scheme)
    assert model.attention_dtype == torch.float32
    idx = torch.randint(0, HP["n_vocab"], (4, 9), generator=torch.Generator().manual_seed(9)).cuda()
    assert torch.equal(generate(model, idx, 30, decode="cuda_graph"), generate(model, idx, 30, decode="eager"))


def test_bench_times_int8_on_cuda_with_its_graph_capture(hub_env, tmp_path):
    import json

    from conftest import TINY64

    from gpt2hub.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--model", TINY64.name, "--device", "cuda", "--dtype", "int8", "--repeats", "1",
                 "--new-tokens", "4", "--no-transformers", "--out", str(out)]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    graph = [g for g in run["generation"] if g["impl"] == "gpt2hub (cuda_graph)"]
    assert graph and graph[0]["graph_capture_s"]["median"] > 0 and graph[0]["produced"] == [4]
