"""scan_cache and the cache commands on top of it: list (table and JSON), rm with its options, verify, prune."""

import json
import os

import pytest
from conftest import TINY

import gpt2hub
from gpt2hub import from_pretrained, load_tokenizer, scan_cache
from gpt2hub.cli import main
from gpt2hub.inventory import model_entry

DATA = "model.ckpt.data-00000-of-00001"


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    return tmp_path / "hf_home" / "hub"


def test_scan_cache_describes_each_model(hub_env, server, hf_cache):
    assert scan_cache().models == ()
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    load_tokenizer("gpt2-tiny", source="hf")  # two of four files: partial
    info = scan_cache()
    assert info.root == hub_env and [(m.source, m.status) for m in info.models] == [("openai", "complete"),
                                                                                      ("hf", "partial")]
    openai, hf = info.models
    assert openai.name == "gpt2-tiny" and openai.size == TINY.size and openai.dtypes == ("bfloat16",)
    assert openai.bytes_on_disk > (hub_env / "openai/tiny/raw" / DATA).stat().st_size and not openai.missing
    assert openai.last_used is not None and openai.last_modified >= openai.last_used - 1
    assert sorted(hf.missing) == ["config.json", "model.safetensors"] and hf.bytes_elsewhere > 0
    assert info.total_bytes == sum(m.bytes_on_disk for m in info.models)


def test_cache_list_json_and_table(hub_env, server, capsys):
    from_pretrained("gpt2-tiny")
    (hub_env / "openai/other-size/converted").mkdir(parents=True)  # a model this process never registered
    (hub_env / "openai/other-size/converted/float32.json").write_text("{}")  # ... holding gpt2hub's records
    (hub_env / "openai/not-a-model").mkdir()  # a user's own folder: no entry of gpt2hub's
    assert main(["cache", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {m["size"]: m for m in data["models"]}
    assert rows["tiny"]["status"] == "complete" and rows["tiny"]["dtypes"] == ["float32"]
    assert rows["other-size"]["status"] == "empty" and rows["other-size"]["name"] == "other-size"
    assert "not-a-model" not in rows
    assert data["total_bytes"] == sum(m["bytes_on_disk"] for m in data["models"])
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-tiny" in out and "complete" in out and "total:" in out and "other-size" in out


def test_rm_dry_run_dtype_all_and_what_list_shows(hub_env, server, capsys):
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    from_pretrained("gpt2-tiny")
    before = sorted(p for p in hub_env.rglob("*"))
    assert main(["cache", "rm", "gpt2-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove" in out and "would free" in out and sorted(p for p in hub_env.rglob("*")) == before
    assert main(["cache", "rm", "tiny", "--dtype", "bfloat16", "-y"]) == 0
    out = capsys.readouterr().out
    conv = hub_env / "openai/tiny/converted"
    assert "freed" in out and not (conv / "bfloat16.safetensors").exists() and (conv / "float32.json").exists()
    (hub_env / "openai/unregistered").mkdir()
    (hub_env / "openai/unregistered/x").write_bytes(b"12345")
    (hub_env / "openai/tiny/raw/notes.md").write_text("mine")  # a user's file inside an entry
    assert main(["cache", "rm", "unregistered"]) != 0  # registered names only, with a suggestion
    assert "unknown model 'unregistered'" in capsys.readouterr().err and (hub_env / "openai/unregistered/x").exists()
    assert main(["cache", "rm", "--all", "-y"]) == 0
    out, err = capsys.readouterr()
    assert "left 1 file(s) gpt2hub did not write" in err and (hub_env / "openai/tiny/raw/notes.md").read_text() == "mine"
    assert not (hub_env / "openai/tiny/files.json").exists() and not (hub_env / "openai/tiny/converted").exists()
    assert (hub_env / "openai/unregistered/x").read_bytes() == b"12345"
    assert [(m.name, m.status, m.files) for m in scan_cache().models] == [("gpt2-tiny", "empty", ())]


def test_rm_include_hf_removes_the_hugging_face_copy_and_only_it(hub_env, server, hf_cache, capsys, tmp_path):
    from_pretrained("gpt2-tiny", source="hf")
    blobs = list((hf_cache).rglob("blobs/*"))
    assert blobs
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    assert main(["cache", "rm", "gpt2-tiny", "--source", "hf"]) == 0  # without --include-hf the HF copy stays
    assert all(b.exists() for b in blobs)
    from_pretrained("gpt2-tiny", source="hf")
    assert main(["cache", "rm", "gpt2-tiny", "--source", "hf", "--include-hf"]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face cache" in out and not any(b.exists() for b in blobs) and victim.exists()


def test_rm_of_a_linked_model_folder_removes_the_link_only(hub_env, server, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("mine")
    gpt2hub.download_files("gpt2-tiny")
    gpt2hub.inventory.remove(gpt2hub.inventory.plan_removal(hub_env, "gpt2-tiny"))
    (hub_env / "openai/tiny").symlink_to(elsewhere)
    assert main(["cache", "rm", "gpt2-tiny"]) == 0
    assert not os.path.lexists(hub_env / "openai/tiny") and (elsewhere / "keep").read_text() == "mine"


def test_verify_names_each_missing_or_damaged_file_once(hub_env, server, capsys):
    from_pretrained("gpt2-tiny")
    raw = hub_env / "openai/tiny/raw"
    (raw / "vocab.bpe").unlink()
    data = bytearray((raw / DATA).read_bytes())
    data[100] ^= 1
    (raw / DATA).write_bytes(bytes(data))
    assert main(["cache", "verify"]) == 1
    out = capsys.readouterr().out
    assert out.count(str(raw / "vocab.bpe")) == 1 and out.count(str(raw / DATA)) == 1 and "2 problem(s)" in out
    model_entry(hub_env, "tiny").forget("encoder.json")
    main(["cache", "verify"])
    assert "encoder.json: not downloaded" in capsys.readouterr().out  # 3 of 7 files would not say ok


def test_prune_on_a_read_only_cache_is_one_line(hub_env, server, capsys, monkeypatch):
    gpt2hub.download_files("gpt2-tiny")
    (hub_env / "openai/tiny/raw" / f"{DATA}.123.incomplete").write_bytes(b"x")

    def read_only(path, *args, **kwargs):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(gpt2hub.files.os, "unlink", read_only)
    code = main(["cache", "prune"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("gpt2hub: error:") and err.count("\n") == 1 and "GPT2HUB_CACHE" in err
