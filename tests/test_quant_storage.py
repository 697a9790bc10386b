"""int8 and int4 as the third storage of the load path: quantized once into the cache, mapped on every later load,
checked, repaired and removed like the other storages (gpt2hub.quant's arithmetic is tested in test_quant.py)."""

import json
import os
from math import prod

import pytest
import torch
from conftest import TINY, TINY64

from gpt2hub import ConversionError, from_pretrained, quant, save_pretrained
from gpt2hub.cli import main
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.inventory import check_cache, model_entry

X = torch.arange(40)[None] * 7


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).float()


def book_config() -> dict:
    return config_from_hparams(TINY64.hparams())


def _expected(weights: dict, scheme: str) -> torch.Tensor:
    """The logits of the quantized model built by hand from the published float32 tensors."""
    book = book_config()
    sd = openai_state_dict(lambda n: torch.from_numpy(weights[f"model/{n}"]), book, torch.float32)
    return _logits(quant.quantized_model(book, quant.quantize_state_dict(sd, scheme), scheme))


@pytest.fixture
def pinless(monkeypatch):
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")  # the test checkpoints have random weights


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_once_then_mapped_with_no_request(hub_env, server, tiny64_folder, pinless, scheme):
    cold = from_pretrained(TINY64.name, dtype=scheme)
    assert isinstance(cold.trf_blocks[0].att.W_qkv, quant.QuantLinear)
    assert torch.equal(_logits(cold), _expected(tiny64_folder[1], scheme))
    entry = model_entry(hub_env, TINY64.name)
    stored = entry.dir / "converted" / f"{scheme}.safetensors"
    manifest = json.loads((entry.dir / "converted" / f"{scheme}.json").read_text())
    assert manifest["kind"] == "quantized" and manifest["scheme"] == scheme
    assert manifest["group_size"] == (64 if scheme == "int4" else None) and manifest["head"] == scheme
    assert stored.stat().st_mode & 0o777 == 0o444
    written, requests = stored.stat().st_mtime_ns, len(server.served.log)
    warm = from_pretrained(TINY64.name, dtype=scheme)
    assert len(server.served.log) == requests and stored.stat().st_mtime_ns == written
    assert torch.equal(_logits(warm), _logits(cold))
    # the file holds exactly quant's documented tensors, each starting on a 64-byte boundary once mapped
    raw = stored.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    layout = quant.stored_layout(book_config(), scheme)
    assert [k for k in header if k != "__metadata__"] == list(layout)
    assert all((8 + n + header[k]["data_offsets"][0]) % 64 == 0 for k in layout)
    assert len(raw) == 8 + n + sum(t.itemsize * prod(shape) for t, shape in layout.values())


def test_quantized_logits_stay_near_float32_and_the_tokens_come_out(hub_env, server, pinless):
    ref = _logits(from_pretrained(TINY64.name))
    errors = {s: (_logits(from_pretrained(TINY64.name, dtype=s)) - ref).abs().mean().item()
              for s in ("bfloat16", "int8", "int4")}
    assert errors["bfloat16"] < errors["int8"] < errors["int4"]
    assert errors["int8"] < 0.05 * ref.abs().mean().item()  # (these random weights are rougher than GPT-2's)
    int4 = _logits(from_pretrained(TINY64.name, dtype="int4"))
    assert torch.corrcoef(torch.stack([int4.flatten(), ref.flatten()]))[0, 1] > 0.9
    model = from_pretrained(TINY64.name, dtype="int4")
    from gpt2hub import generate

    out = generate(model, X[:, :5], max_new_tokens=6)
    assert out.shape == (1, 11) and torch.equal(out, generate(model, X[:, :5], max_new_tokens=6, use_cache=False))


def test_a_stored_file_damaged_in_place_is_found_and_quantized_again(hub_env, server, pinless):
    first = _logits(from_pretrained(TINY64.name, dtype="int8"))
    stored = model_entry(hub_env, TINY64.name).dir / "converted" / "int8.safetensors"
    st = stored.stat()
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as f:  # one byte of the codes, size and timestamps kept
        f.seek(st.st_size - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x5A]))
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
    problems = [p for _, found in check_cache(hub_env).entries for p in found if p.path == stored]
    assert problems and "crc32c" in problems[0].what
    assert torch.equal(_logits(from_pretrained(TINY64.name, dtype="int8")), first)
    assert [found for _, found in check_cache(hub_env).entries] == [[]]


def test_a_manifest_naming_another_group_size_makes_the_file_again(hub_env, server, pinless):
    first = _logits(from_pretrained(TINY64.name, dtype="int4"))
    path = model_entry(hub_env, TINY64.name).dir / "converted" / "int4.json"
    manifest = json.loads(path.read_text())
    os.chmod(path, 0o644)
    path.write_text(json.dumps({**manifest, "group_size": 32}))  # as a gpt2hub with another default would write
    requests = len(server.served.log)
    assert torch.equal(_logits(from_pretrained(TINY64.name, dtype="int4")), first)
    assert json.loads(path.read_text())["group_size"] == 64 and len(server.served.log) == requests


def test_a_stored_file_with_other_tensors_is_made_again(hub_env, server, pinless):
    first = _logits(from_pretrained(TINY64.name, dtype="int8"))
    entry = model_entry(hub_env, TINY64.name)
    other = entry.dir / "converted" / "int8.safetensors"
    from_pretrained(TINY64.name, dtype="bfloat16")
    bf16 = entry.dir / "converted" / "bfloat16.safetensors"
    manifest_path = entry.dir / "converted" / "int8.json"
    manifest = json.loads(manifest_path.read_text())
    os.chmod(other, 0o644)
    other.write_bytes(bf16.read_bytes())  # a valid safetensors file, with its checksum recorded: not int8's tensors
    from gpt2hub.files import crc32c_file

    os.chmod(manifest_path, 0o644)
    st = other.stat()
    manifest_path.write_text(json.dumps({**manifest, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                                         "crc32c": crc32c_file(other)}))
    assert torch.equal(_logits(from_pretrained(TINY64.name, dtype="int8")), first)


def test_a_folder_loads_quantized_in_memory_and_a_narrow_model_says_why_int4_cannot(tiny64_folder, tiny_folder,
                                                                                  tmp_path, pinless):
    model = from_pretrained(tiny64_folder[0], dtype="int8")
    assert torch.equal(_logits(model), _expected(tiny64_folder[1], "int8"))
    with pytest.raises(ConversionError, match="cannot be stored as int4: group_size 64 does not divide .* emb_dim=32"):
        from_pretrained(tiny_folder[0], dtype="int4")
    assert isinstance(from_pretrained(tiny_folder[0], dtype="int8").out_head, quant.QuantLinear)


def test_int4_of_a_narrow_cached_model_is_refused_and_leaves_the_cache_as_it_was(hub_env, server, pinless):
    from_pretrained(TINY.name)
    converted = model_entry(hub_env, TINY.name).dir / "converted"
    before = sorted(p.name for p in converted.iterdir())
    with pytest.raises(ConversionError, match="gpt2-tiny.*int4"):
        from_pretrained(TINY.name, dtype="int4")
    assert sorted(p.name for p in converted.iterdir()) == before


def test_cli_loads_lists_and_removes_quantized_weights(hub_env, server, pinless, capsys):
    assert main(["generate", "--model", TINY64.name, "--dtype", "int4", "--max-new-tokens", "3", "Hello"]) == 0
    assert main(["download", TINY64.name]) == 0
    from_pretrained(TINY64.name, dtype="int8")
    capsys.readouterr()
    assert main(["cache", "list"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(TINY64.name)][0]
    assert "int4" in row and "int8" in row
    converted = model_entry(hub_env, TINY64.name).dir / "converted"
    assert main(["cache", "rm", TINY64.name, "--dtype", "int8", "-y"]) == 0
    assert not (converted / "int8.safetensors").exists() and (converted / "int4.safetensors").exists()
    with pytest.raises(SystemExit) as e:
        main(["export", TINY64.name, str(hub_env.parent / "out"), "--dtype", "int8"])
    assert e.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_a_quantized_model_is_not_exported(hub_env, server, pinless, tmp_path):
    model = from_pretrained(TINY64.name, dtype="int8")
    with pytest.raises(ValueError, match="int8/int4 layers, which export does not write"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_pins_refuse_random_weights_for_quantized_storage_too(hub_env, server, tiny64_folder, monkeypatch):
    from dataclasses import replace

    from gpt2hub import IntegrityError
    from gpt2hub.registry import register

    monkeypatch.delenv("GPT2HUB_IGNORE_PINS", raising=False)
    for f in tiny64_folder[0].iterdir():
        server.served.files[f"/tiny64pin/{f.name}"] = f.read_bytes()
    pinned = register(replace(TINY64, name="gpt2-tiny64-pinned", size="tiny64pin", hf_repo="test-org/gpt2-tiny64-pin",
                              sha256={"openai": {**TINY64.sha256["openai"], "model.ckpt.data-00000-of-00001": "0" * 64}}))
    with pytest.raises(IntegrityError, match="model.ckpt.data.*GPT2HUB_IGNORE_PINS"):
        from_pretrained(pinned.name, dtype="int8")
    assert not list(hub_env.rglob("int8.*"))


@pytest.mark.parametrize("scheme", ["int8", "q4"])
def test_torch_hub_loads_quantized_weights_from_the_cache(hub_env, server, pinless, scheme):
    from pathlib import Path

    local = str(Path(__file__).parents[1])  # hubconf.py, as torch.hub.load(..., source="local") reads it
    model = torch.hub.load(local, "from_pretrained", TINY64.name, source="local", dtype=scheme)
    assert isinstance(model.trf_blocks[0].ff.layers[0], quant.Int8Linear if scheme == "int8" else quant.Int4Linear)
    stored = model_entry(hub_env, TINY64.name).dir / "converted"
    assert [p.name for p in stored.glob("int*.safetensors")] == [("int8" if scheme == "int8" else "int4") + ".safetensors"]
    requests = len(server.served.log)
    assert torch.equal(_logits(model), _logits(from_pretrained(TINY64.name, dtype=scheme)))
    assert len(server.served.log) == requests  # the same stored file, mapped again


def test_cli_generates_with_int4_the_text_of_the_api_and_removes_int4_alone(hub_env, server, pinless, capsys):
    from gpt2hub import load_tokenizer, stream_text

    assert main(["generate", "--model", TINY64.name, "--dtype", "int4", "--max-new-tokens", "6", "Every effort"]) == 0
    model = from_pretrained(TINY64.name, dtype="int4")
    expected = "Every effort" + "".join(stream_text(model, load_tokenizer(TINY64.name), "Every effort", 6)) + "\n"
    assert capsys.readouterr().out == expected
    from_pretrained(TINY64.name, dtype="int8")
    converted = model_entry(hub_env, TINY64.name).dir / "converted"
    assert main(["cache", "rm", TINY64.name, "--dtype", "int4", "-y"]) == 0
    assert "converted/int4.* (" in capsys.readouterr().out
    assert not list(converted.glob("int4.*")) and (converted / "int8.safetensors").exists()
    assert (model_entry(hub_env, TINY64.name).raw / "model.ckpt.data-00000-of-00001").exists()  # the published stay
    assert main(["cache", "rm", TINY64.name, "--dtype", "int4", "-y"]) == 0
    assert "no int4 weights of it are stored" in capsys.readouterr().out
