"""Export: gpt2hub -> Hugging Face folder -> transformers / gpt2hub, gpt2hub's own safetensors, torch.hub entry points."""

import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import TINY, TINY_HP
from factory import DATA

import gpt2hub
from gpt2hub import ConversionError, GPTModel, from_pretrained, save_pretrained
from gpt2hub.export import OWN_CONFIG, OWN_WEIGHTS, contiguous_copy, export_model, hf_state_dict
from gpt2hub.storage import load_safetensors

ROOT = Path(__file__).parent.parent
transformers = pytest.importorskip("transformers")  # a test dependency: pyproject's [test] extra


def _prompts(vocab: int = TINY_HP["n_vocab"], n_ctx: int = TINY_HP["n_ctx"]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (1, 1), generator=g), torch.randint(0, vocab, (2, 13), generator=g),
            torch.randint(0, vocab, (1, n_ctx), generator=g)]


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out).float()  # a transformers model returns an output object


def _max_diff(a, b) -> float:
    """The largest logit difference of two models (GPTModel or transformers') over a few prompts."""
    with torch.no_grad():
        return max((_logits(a, x) - _logits(b, x)).abs().max().item() for x in _prompts())


def _hf_load(folder: Path):
    """transformers' model for `folder`, asserting every tensor was found in the file (none randomly initialised)."""
    model, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _header(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


def _equal_state(a: GPTModel, b: GPTModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.fixture(params=["openai-float32", "hf-float32", "openai-bfloat16"])
def loaded(request, hub_env):
    """The tiny model as the cache hands it out: mapped OpenAI ([in, out] views), mapped HF, converted bfloat16."""
    source, dtype = request.param.split("-")
    return from_pretrained(TINY.name, source=source, dtype=dtype)


def test_hf_export_loads_in_transformers_with_equal_logits(loaded, tmp_path):
    out = save_pretrained(loaded, tmp_path / "hf", dtype="float32")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["n_layer"] == TINY_HP["n_layer"] and cfg["torch_dtype"] == "float32"
    header = _header(out / "model.safetensors")
    assert "lm_head.weight" not in header and all(k.startswith("transformer.") for k in header)
    assert header["transformer.h.0.attn.c_attn.weight"] and set(header.values()) == {"F32"}
    assert _max_diff(loaded.float(), _hf_load(out)) <= 1e-4


def test_hf_export_round_trips_through_gpt2hub(loaded, tmp_path):
    out = save_pretrained(loaded, tmp_path / "hf")
    back = from_pretrained(out, dtype=loaded.tok_emb.weight.dtype)
    assert back.tied and _equal_state(loaded, back)
    assert _max_diff(loaded, back) <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_export_loads_with_the_rounded_weights(hf_folder, tmp_path, dtype):
    model = from_pretrained(hf_folder)
    out = save_pretrained(model, tmp_path / dtype, dtype=dtype)
    assert set(_header(out / "model.safetensors").values()) == {"BF16" if dtype == "bfloat16" else "F16"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    rounded = from_pretrained(out)  # gpt2hub reads it back in float32: exactly the model's weights rounded once
    sd, want = rounded.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], want[k].to(getattr(torch, dtype)).float()) for k in want)
    assert _max_diff(rounded, _hf_load(out).float()) <= 1e-4


def test_safetensors_format_round_trips(loaded, tmp_path):
    out = save_pretrained(loaded, tmp_path / "own", format="safetensors")
    assert sorted(p.name for p in out.iterdir()) == [OWN_CONFIG, OWN_WEIGHTS]
    sd = load_safetensors(out / OWN_WEIGHTS)
    assert "out_head.weight" not in sd and set(sd) == set(loaded.state_dict()) - {"out_head.weight"}
    back = GPTModel.from_state_dict(json.loads((out / OWN_CONFIG).read_text()), sd)
    assert back.tied and back.cfg == loaded.cfg and _equal_state(loaded, back)
    assert _max_diff(loaded, back) <= 1e-5


def _untied(hf_folder) -> GPTModel:
    model = from_pretrained(hf_folder, tie_weights=False)
    with torch.no_grad():
        model.out_head.weight.mul_(0.5).add_(0.01)
    return model


def test_untied_head_round_trips(hf_folder, tmp_path):
    model = _untied(hf_folder)
    out = save_pretrained(model, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in _header(out / "model.safetensors")
    hf = _hf_load(out)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    assert _max_diff(model, hf) <= 1e-4
    back = from_pretrained(out)
    assert not back.tied and _equal_state(model, back) and _max_diff(model, back) <= 1e-5
    own = save_pretrained(model, tmp_path / "own", format="safetensors")
    sd = load_safetensors(own / OWN_WEIGHTS)
    again = GPTModel.from_state_dict(model.cfg, sd)
    assert "out_head.weight" in sd and not again.tied and _max_diff(model, again) <= 1e-5


def test_untied_head_with_the_embedding_values_is_stored_once(hf_folder, tmp_path):
    model = from_pretrained(hf_folder, tie_weights=False)  # the head is a copy: the same function as a tied one
    assert not model.tied
    out = save_pretrained(model, tmp_path / "hf")
    assert "lm_head.weight" not in _header(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_model_without_qkv_bias_exports_zero_biases(tmp_path):
    cfg = {**TINY.config(), "qkv_bias": False}
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    tensors = hf_state_dict(model)
    assert torch.equal(tensors["transformer.h.1.attn.c_attn.bias"], torch.zeros(3 * cfg["emb_dim"]))
    out = save_pretrained(model, tmp_path / "hf")
    assert _max_diff(model, _hf_load(out)) <= 1e-4


def test_dropout_rate_is_exported(tmp_path):
    model = GPTModel({**TINY.config(), "drop_rate": 0.25})
    cfg = json.loads((save_pretrained(model, tmp_path / "hf") / "config.json").read_text())
    assert cfg["embd_pdrop"] == cfg["resid_pdrop"] == cfg["attn_pdrop"] == 0.25


def test_untied_config_without_head_is_refused(hf_folder, tmp_path):
    out = save_pretrained(from_pretrained(hf_folder), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(ConversionError, match="tie_word_embeddings false.*lm_head.weight"):
        from_pretrained(out)


def test_tokenizer_files_are_written_for_transformers_and_gpt2hub(hf_folder, tmp_path):
    model = from_pretrained(hf_folder)
    pair = (DATA / "encoder.json", DATA / "vocab.bpe")
    out = save_pretrained(model, tmp_path / "hf", tokenizer_files=pair)
    assert (out / "vocab.json").read_bytes() == pair[0].read_bytes()
    assert (out / "merges.txt").read_bytes() == pair[1].read_bytes()
    text = "Every effort moves you, naïvely 1234 times.<|endoftext|>"
    ours = gpt2hub.load_tokenizer(out).encode(text, allowed_special="all")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert hf(text)["input_ids"] == ours and hf.model_max_length == TINY_HP["n_ctx"]
    own = save_pretrained(model, tmp_path / "own", format="safetensors", tokenizer_files=hf_folder)  # a folder
    assert (own / "encoder.json").read_bytes() == pair[0].read_bytes()
    assert (own / "vocab.bpe").read_bytes() == pair[1].read_bytes()


def test_contiguous_copy_makes_safetensors_save_model_work(loaded, tmp_path):
    copy = contiguous_copy(loaded)
    assert copy.tied and all(p.is_contiguous() for p in copy.parameters())
    ours = {p.data_ptr() for p in loaded.parameters()}
    assert not ours & {p.data_ptr() for p in copy.parameters()}  # it owns its memory: the cache file is not touched
    safetensors.torch.save_model(copy, str(tmp_path / "m.safetensors"))
    fresh = GPTModel(loaded.cfg, tie_weights=True).to(loaded.tok_emb.weight.dtype)  # tied, as the saved model
    missing, unexpected = safetensors.torch.load_model(fresh, str(tmp_path / "m.safetensors"))
    assert not missing and not unexpected and fresh.eval().tied and _equal_state(loaded, fresh)


def test_contiguous_copy_keeps_an_untied_head(hf_folder, tmp_path):
    model = _untied(hf_folder)
    copy = contiguous_copy(model)
    safetensors.torch.save_model(copy, str(tmp_path / "m.safetensors"))
    fresh = GPTModel(model.cfg)  # the book's untied head, as the saved model
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "m.safetensors"))
    assert not copy.tied and not fresh.tied and _max_diff(model, fresh.eval()) <= 1e-5


def test_export_model_writes_weights_and_vocabulary(hub_env, tmp_path):
    out = export_model(TINY.name, tmp_path / "hf", dtype="bf16", source="hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "model.safetensors",
                                                     "tokenizer_config.json", "vocab.json"]
    assert (out / "vocab.json").read_bytes() == (DATA / "encoder.json").read_bytes()
    assert _equal_state(from_pretrained(out, dtype="bf16"), from_pretrained(TINY.name).to(torch.bfloat16))
    own = export_model(TINY.name, tmp_path / "own", format="safetensors")
    assert (own / "vocab.bpe").read_bytes() == (DATA / "vocab.bpe").read_bytes()


def test_bad_arguments_name_the_argument(hf_folder, tmp_path):
    model = from_pretrained(hf_folder)
    with pytest.raises(ValueError, match="format='onnx'"):
        save_pretrained(model, tmp_path / "a", format="onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="folder=.*is an existing file"):
        save_pretrained(model, tmp_path / "file")
    with pytest.raises(ValueError, match="dtype='int8' is not written by export: use one of float32, bfloat16"):
        save_pretrained(model, tmp_path / "b", dtype="int8")  # quantized weights have no transformers reader
    with pytest.raises(ValueError, match="dtype 'int3'"):
        save_pretrained(model, tmp_path / "b", dtype="int3")
    with pytest.raises(ValueError, match="model must be a gpt2hub GPTModel"):
        save_pretrained(model.state_dict(), tmp_path / "c")  # type: ignore[arg-type]
    swapped = (DATA / "vocab.bpe", DATA / "encoder.json")
    with pytest.raises(ValueError, match="tokenizer_files=.*not a GPT-2 vocabulary"):
        save_pretrained(model, tmp_path / "d", tokenizer_files=swapped)
    with pytest.raises(ValueError, match="tokenizer_files=.*holds neither"):
        save_pretrained(model, tmp_path / "e", tokenizer_files=tmp_path)
    with pytest.raises(ValueError, match="tokenizer_files=.*is not a pair"):
        save_pretrained(model, tmp_path / "f", tokenizer_files=str(DATA / "encoder.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing was written for a refused call


# torch.hub ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights_source", ["openai", "hf"])
def test_torch_hub_local_load_is_from_pretrained(hub_env, weights_source):
    model = torch.hub.load(str(ROOT), "from_pretrained", TINY.name, source="local", weights_source=weights_source,
                           dtype="bfloat16")
    assert isinstance(model, GPTModel) and model.tok_emb.weight.dtype == torch.bfloat16 and not model.training
    assert _max_diff(model, from_pretrained(TINY.name, source=weights_source, dtype="bfloat16")) == 0.0


def test_torch_hub_tokenizer(hub_env):
    enc = torch.hub.load(str(ROOT), "gpt2_tokenizer", TINY.name, source="local")
    assert enc.encode("Every effort moves you") == gpt2hub.load_tokenizer(TINY.name).encode("Every effort moves you")


@pytest.mark.parametrize("entry, name", [("gpt2", "gpt2-small"), ("gpt2_medium", "gpt2-medium"),
                                         ("gpt2_large", "gpt2-large"), ("gpt2_xl", "gpt2-xl")])
def test_torch_hub_size_entries_ask_for_their_model(monkeypatch, entry, name):
    calls = []
    monkeypatch.setattr(gpt2hub, "from_pretrained", lambda *a, **kw: calls.append((a, kw)) or "model")
    got = torch.hub.load(str(ROOT), entry, source="local", dtype="bf16", device="cpu", weights_source="hf",
                         revision="abc123", tie_weights=False)
    assert got == "model"
    assert calls == [((name,), {"dtype": "bf16", "device": "cpu", "source": "hf", "revision": "abc123",
                                "tie_weights": False})]


def test_export_command_writes_a_folder_transformers_loads(hub_env, server, tmp_path, capsys):
    from gpt2hub.cli import main

    assert main(["export", TINY.name, str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    assert "wrote hf files" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    assert _hf_load(tmp_path / "hf").dtype == torch.bfloat16
    assert main(["export", TINY.name, str(tmp_path / "st"), "--format", "safetensors"]) == 0
    assert (tmp_path / "st" / "gpt2hub.safetensors").exists()
