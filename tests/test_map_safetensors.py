"""safetensors files mapped as one storage (safetensors_file.map_safetensors): the same tensors as safetensors'
own loader, side-by-side tensors viewable as one (GPTModel's fused QKV), writes kept out of the file, damage refused."""

import pytest
import torch
from factory import random_weights

from gpt2hub import GPTModel
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.safetensors_file import load_safetensors, map_safetensors, save_state_dict

HP = {"n_vocab": 300, "n_ctx": 48, "n_embd": 48, "n_head": 4, "n_layer": 2}


@pytest.fixture
def bf16_file(tmp_path):
    cfg = config_from_hparams(HP)
    w = random_weights(HP, seed=3)
    sd = openai_state_dict(lambda n: w[f"model/{n}"], cfg, torch.bfloat16)
    save_state_dict({**sd, "codes": torch.arange(10, dtype=torch.uint8), "signed": torch.tensor([-3, 4], dtype=torch.int8)},
                    tmp_path / "w.safetensors")
    return cfg, tmp_path / "w.safetensors"


def test_the_same_tensors_as_safetensors_gives_in_one_storage(bf16_file):
    cfg, path = bf16_file
    mapped, loaded = map_safetensors(path), load_safetensors(path)
    assert sorted(mapped) == sorted(loaded)
    for name, t in mapped.items():
        assert t.dtype == loaded[name].dtype and torch.equal(t, loaded[name]), name
    assert len({t.untyped_storage().data_ptr() for t in mapped.values()}) == 1
    model = GPTModel.from_state_dict(cfg, {k: v for k, v in mapped.items() if k not in ("codes", "signed")})
    assert all(block.att.fused_qkv() is not None for block in model.trf_blocks)  # W_query, W_key, W_value as one
    reference = GPTModel.from_state_dict(cfg, {k: v for k, v in loaded.items() if k not in ("codes", "signed")})
    assert all(block.att.fused_qkv() is None for block in reference.trf_blocks)  # a storage each: three products
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx), reference(idx))


def test_writes_stay_out_of_the_file(bf16_file):
    _, path = bf16_file
    before = path.read_bytes()
    mapped = map_safetensors(path)
    mapped["tok_emb.weight"].zero_()
    assert path.read_bytes() == before and bool(map_safetensors(path)["tok_emb.weight"].any())


@pytest.mark.parametrize("damage", ["truncated", "header", "not an object", "offsets", "dtype", "empty"])
def test_damaged_files_are_one_line_value_errors_naming_them(bf16_file, damage):
    _, path = bf16_file
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = data[8:8 + n].decode()
    if damage == "truncated":
        path.write_bytes(data[:len(data) - 100])
    elif damage == "header":
        path.write_bytes(data[:8] + b"x" + data[9:])
    elif damage == "not an object":
        path.write_bytes(data[:8] + b"[" + b" " * (n - 2) + b"]" + data[8 + n:])
    elif damage == "offsets":
        path.write_bytes(data[:8] + header.replace('"data_offsets":[0,', '"data_offsets":[7,', 1).encode() + data[8 + n:])
    elif damage == "dtype":
        path.write_bytes(data[:8] + header.replace('"BF16"', '"F64"', 1).encode() + data[8 + n:])
    else:
        path.write_bytes(b"")
    with pytest.raises(ValueError) as err:
        map_safetensors(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
