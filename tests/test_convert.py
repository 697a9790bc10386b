import numpy as np
import pytest
import torch
from book_model import BookGPTModel
from conftest import TINY_HP
from factory import hf_reference, hf_tensors, random_weights, write_openai_folder

from gpt2hub import (
    ConversionError,
    GPTModel,
    TFCheckpoint,
    from_pretrained,
    load_weights_into_gpt,
    state_dict_from_hf,
    state_dict_from_params,
    state_dict_from_tf,
)
from gpt2hub.convert import config_from_hparams, params_from_tf

SMALL_HP = {"n_vocab": 1000, "n_ctx": 48, "n_embd": 48, "n_head": 6, "n_layer": 3}


def _prompts(vocab: int, n_ctx: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (1, 1), generator=g), torch.randint(0, vocab, (2, 17), generator=g),
            torch.randint(0, vocab, (3, n_ctx), generator=g)]


def _max_diff(model: torch.nn.Module, ref: torch.nn.Module, hp: dict) -> float:
    with torch.no_grad():
        return max((model(x) - ref(x).logits).abs().max().item() for x in _prompts(hp["n_vocab"], hp["n_ctx"]))


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    return folder, write_openai_folder(folder, SMALL_HP, seed=7)


@pytest.mark.parametrize("which", ["tiny", "small"])
def test_tf_path_matches_transformers(which, tiny_folder, small_folder):
    folder, weights = tiny_folder if which == "tiny" else small_folder
    hp = TINY_HP if which == "tiny" else SMALL_HP
    cfg = config_from_hparams(hp)
    model = GPTModel.from_state_dict(cfg, state_dict_from_tf(TFCheckpoint(folder), cfg))
    assert model.tied and model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    assert _max_diff(model, hf_reference(weights, hp), hp) <= 1e-4


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_hf_safetensors_layout_matches_transformers(prefix):
    weights = random_weights(SMALL_HP, seed=11)
    tensors = {prefix + k: torch.from_numpy(v) for k, v in hf_tensors(weights).items()}
    assert "h.0.attn.bias" in {k.removeprefix(prefix) for k in tensors}  # the mask buffers are there, to be dropped
    cfg = config_from_hparams(SMALL_HP)
    model = GPTModel.from_state_dict(cfg, state_dict_from_hf(tensors, cfg))
    assert _max_diff(model, hf_reference(weights, SMALL_HP), SMALL_HP) <= 1e-4


def test_book_params_path_and_book_model(small_folder):
    folder, weights = small_folder
    ckpt = TFCheckpoint(folder)
    params = params_from_tf(ckpt, SMALL_HP["n_layer"])
    assert set(params) == {"blocks", "b", "g", "wpe", "wte"}
    assert params["blocks"][1]["attn"]["c_attn"]["w"].shape == (48, 144)  # squeezed, as the book has it
    params["wte"][0, 0] += 0  # writable, as tf.train.load_variable's arrays are
    cfg = {**config_from_hparams(SMALL_HP), "drop_rate": 0.1}
    ref = hf_reference(weights, SMALL_HP)
    ours = GPTModel.from_state_dict(cfg, state_dict_from_params(params, cfg))
    assert _max_diff(ours, ref, SMALL_HP) <= 1e-4
    torch.manual_seed(0)
    book = BookGPTModel(cfg).eval()
    load_weights_into_gpt(book, params)
    assert _max_diff(book, ref, SMALL_HP) <= 1e-4
    fresh = GPTModel(cfg).eval()
    load_weights_into_gpt(fresh, params)
    assert _max_diff(fresh, ref, SMALL_HP) <= 1e-4


def test_book_state_dict_loads_with_masks_and_untied_head():
    cfg = {**config_from_hparams(SMALL_HP), "drop_rate": 0.1}
    torch.manual_seed(0)
    book = BookGPTModel(cfg).eval()  # trained from scratch in the book: out_head differs from tok_emb
    sd = book.state_dict()
    assert any(k.endswith("att.mask") for k in sd)
    ours = GPTModel(cfg, tie_weights=True).eval()
    ours.load_state_dict(sd)
    assert not ours.tied
    x = _prompts(SMALL_HP["n_vocab"], SMALL_HP["n_ctx"])[1]
    with torch.no_grad():
        assert torch.allclose(ours(x), book(x), atol=1e-4)
    # tied weights saved by the book's load_weights_into_gpt stay one tensor here
    sd["out_head.weight"] = sd["tok_emb.weight"].clone()
    tied = GPTModel(cfg, tie_weights=True)
    tied.load_state_dict(sd)
    assert tied.tied


def test_dtypes_are_written_once_in_the_target_dtype(small_folder):
    cfg = config_from_hparams(SMALL_HP)
    for dtype in (torch.bfloat16, torch.float16):
        sd = state_dict_from_tf(TFCheckpoint(small_folder[0]), cfg, dtype)
        assert {t.dtype for t in sd.values()} == {dtype}
        assert all(t.is_contiguous() for t in sd.values())
        model = GPTModel.from_state_dict(cfg, sd)
        ref = GPTModel.from_state_dict(cfg, state_dict_from_tf(TFCheckpoint(small_folder[0]), cfg))
        x = _prompts(SMALL_HP["n_vocab"], SMALL_HP["n_ctx"])[1]
        with torch.no_grad():
            a, b = model(x).float(), ref(x)
        assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_from_pretrained_accepts_a_folder(tiny_folder, hf_folder):
    a = from_pretrained(str(tiny_folder[0]))
    b = from_pretrained(hf_folder)
    x = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-5)


def test_wrong_shapes_are_named():
    weights = random_weights(SMALL_HP)
    weights["model/h1/mlp/c_fc/w"] = np.zeros((1, 48, 100), np.float32)
    cfg = config_from_hparams(SMALL_HP)
    with pytest.raises(ConversionError, match="h1/mlp/c_fc/w"):
        state_dict_from_hf({k: torch.from_numpy(v) for k, v in hf_tensors(weights).items()}, cfg)
    weights = random_weights(SMALL_HP)
    del weights["model/ln_f/g"]
    with pytest.raises(ConversionError, match="ln_f/g"):
        state_dict_from_hf({k: torch.from_numpy(v) for k, v in hf_tensors(weights).items()}, cfg)


def test_layouts_hold_the_same_values_and_round_trip_through_the_cache_format(small_folder, tmp_path):
    from gpt2hub.storage import load_safetensors, save_state_dict

    cfg = config_from_hparams(SMALL_HP)
    ckpt = TFCheckpoint(small_folder[0])
    in_out = state_dict_from_tf(ckpt, cfg, layout="in_out")
    out_in = state_dict_from_tf(ckpt, cfg, layout="out_in")
    assert all(v.is_contiguous() for v in out_in.values())
    # float32 "in_out" is views of the mapped checkpoint: W_query/W_key/W_value are c_attn's column blocks
    c_attn = ckpt.read("model/h0/attn/c_attn/w")
    q, k = in_out["trf_blocks.0.att.W_query.weight"], in_out["trf_blocks.0.att.W_key.weight"]
    assert q.stride() == (1, 144) and q.data_ptr() == c_attn.ctypes.data and k.data_ptr() == q.data_ptr() + 48 * 4
    assert in_out["tok_emb.weight"].data_ptr() == ckpt.read("model/wte").ctypes.data
    for k in out_in:
        assert torch.equal(in_out[k], out_in[k]), k
    save_state_dict(in_out, tmp_path / "w.safetensors")
    model = GPTModel.from_state_dict(cfg, load_safetensors(tmp_path / "w.safetensors"))
    assert model.tied and all(p.is_contiguous() for p in model.parameters())  # stored in nn.Linear's layout
    assert model.trf_blocks[0].att.fused_qkv() is None  # as three matrices, a storage each
    ref, views = GPTModel.from_state_dict(cfg, out_in), GPTModel.from_state_dict(cfg, in_out)
    # c_attn is one tensor in both layouts: its column blocks (in_out) or row blocks (out_in) are multiplied as one
    assert ref.trf_blocks[0].att.fused_qkv() is not None and views.trf_blocks[0].att.fused_qkv() is not None
    x = _prompts(SMALL_HP["n_vocab"], SMALL_HP["n_ctx"])[2]
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
        assert torch.allclose(views(x), ref(x), atol=1e-5)
    with pytest.raises(ValueError, match="layout"):
        state_dict_from_tf(ckpt, cfg, layout="diagonal")


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_openai_variables_invert_the_conversion(layout):
    from gpt2hub.convert import openai_state_dict, openai_variables

    weights = {k.removeprefix("model/"): torch.from_numpy(v) for k, v in random_weights(SMALL_HP, seed=5).items()}
    cfg = config_from_hparams(SMALL_HP)
    sd = openai_state_dict(weights.__getitem__, cfg, layout=layout)
    back = openai_variables(sd, cfg)
    assert set(back) == set(weights)
    for name, value in weights.items():  # Conv1D weights come back [in, out], without OpenAI's leading 1
        assert torch.equal(back[name], value.reshape(back[name].shape)) and back[name].numel() == value.numel(), name
    del sd["trf_blocks.2.ff.layers.0.weight"]
    with pytest.raises(ConversionError, match="trf_blocks.2.ff.layers.0.weight"):
        openai_variables(sd, cfg)
