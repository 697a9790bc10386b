"""Bad settings and edge cases of the load path, each a one-line answer naming the thing, with nothing lost; and the
load path's roles apart: a new transport plugs in without touching gpt2hub, and cannot record a file its gate refused."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import TINY, TINY_HP
from server import COMMIT

import gpt2hub
from gpt2hub import CacheError, DownloadError, IntegrityError, SettingError, from_pretrained
from gpt2hub.cache import Cache, EntryKey
from gpt2hub.cli import main
from gpt2hub.hub import Hub
from gpt2hub.storage import storage_for
from gpt2hub.transports import OpenAIMirrors

DATA = "model.ckpt.data-00000-of-00001"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None])


# settings -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("var,value", [("GPT2HUB_READ_TIMEOUT", "0"), ("GPT2HUB_READ_TIMEOUT", "1e10"),
                                       ("GPT2HUB_READ_TIMEOUT", "nan"), ("GPT2HUB_LOCK_TIMEOUT", "-1"),
                                       ("GPT2HUB_LOCK_TIMEOUT", "inf"), ("GPT2HUB_OFFLINE", "ture"),
                                       ("GPT2HUB_IGNORE_PINS", "enabled"), ("HF_HUB_OFFLINE", "2"),
                                       ("GPT2HUB_DISABLE_PROGRESS_BARS", "yes please"), ("GPT2HUB_SHARED_CACHE", "maybe"),
                                       ("GPT2HUB_CACHE", "relative/cache"), ("GPT2HUB_CACHE", "   ")])
def test_a_bad_setting_is_one_line_naming_the_variable_before_any_work(hub_env, server, monkeypatch, capsys, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingError) as e:
        from_pretrained("gpt2-tiny")
    assert var in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 300
    assert server.served.log == [] and not hub_env.exists()
    assert main(["download", "gpt2-tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt2hub: error:") and var in err and err.count("\n") == 1


@pytest.mark.parametrize("value", ["1", "true", "Yes", "ON", "0", "false", "no", "off", ""])
def test_booleans_take_the_usual_spellings(value, monkeypatch):
    monkeypatch.setenv("GPT2HUB_OFFLINE", value)
    assert gpt2hub.settings.offline() is (value.lower() in ("1", "true", "yes", "on"))


def test_the_cache_setting_expands_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GPT2HUB_CACHE", "~/my-cache")
    assert gpt2hub.settings.default_root() == tmp_path / "my-cache"


# hostile hyperparameters ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hparams", [{**TINY_HP, "n_layer": 10**9}, {**TINY_HP, "n_embd": 2**40, "n_head": 1},
                                     {**TINY_HP, "n_vocab": 10**12}, {**TINY_HP, "n_layer": 1000, "n_embd": 8192,
                                                                      "n_head": 64}])
def test_hyperparameters_of_an_impossible_size_are_refused_at_once(hub_env, server, tmp_path, sleeps, hparams,
                                                                   tiny_folder):
    server.served.files["/tiny/hparams.json"] = (json.dumps(hparams, indent=2) + "\n").encode()
    with pytest.raises(IntegrityError, match="hparams.json") as e:
        from_pretrained("gpt2-tiny")
    assert "\n" not in str(e.value) and not server.served.requests("GET", DATA)  # refused before the weights came
    folder = tmp_path / "folder"
    shutil.copytree(tiny_folder[0], folder)
    (folder / "hparams.json").write_text(json.dumps(hparams))
    with pytest.raises(IntegrityError, match="hparams.json"):
        from_pretrained(folder)


# the book's models_dir ------------------------------------------------------------------------------------------------
def test_a_models_dir_that_is_a_file_is_refused_before_downloading(hub_env, server, tmp_path):
    blocker = tmp_path / "gpt2"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="models_dir.*is not a folder"):
        gpt2hub.download_and_load_gpt2("tiny", str(blocker))
    assert server.served.log == [] and blocker.read_text() == "not a folder"


def test_a_right_size_file_of_zeros_in_models_dir_is_not_adopted(hub_env, server, tmp_path, tiny_folder):
    models = tmp_path / "gpt2"
    shutil.copytree(tiny_folder[0], models / "tiny")
    size = (models / "tiny" / DATA).stat().st_size
    (models / "tiny" / DATA).write_bytes(b"\0" * size)  # the size OpenAI's file has, no pin for this size
    settings, params = gpt2hub.download_and_load_gpt2("tiny", str(models))
    assert [p for _, p, _ in server.served.requests("GET")] == [f"/tiny/{DATA}"]  # downloaded, not adopted
    assert (models / "tiny" / DATA).read_bytes() == (tiny_folder[0] / DATA).read_bytes()  # and put right
    (models / "tiny" / DATA).unlink()  # the user deletes it: the book API still works, from the cache
    gpt2hub.download_and_load_gpt2("tiny", str(models))
    assert settings == TINY.hparams() and len(params["blocks"]) == TINY.n_layers


# the Hugging Face Hub's failures --------------------------------------------------------------------------------------
def test_the_hub_unreachable_fails_at_once_naming_it(hub_env, monkeypatch, tmp_path):
    import socket

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connection refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(DownloadError, match=f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}") as e:
        from_pretrained("gpt2-tiny", source="hf")
    assert "\n" not in str(e.value) and "HF_ENDPOINT" in str(e.value)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs at tmp_path/disk (skipped where mounting is not allowed); unmounted after."""
    folder = tmp_path / "disk"
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode()[:100]}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_under_the_hugging_face_cache_is_named_not_blamed_on_the_network(hub_env, server, tiny_disk,
                                                                                    monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tiny_disk / "hub"))
    with pytest.raises(CacheError, match="no space left on the device holding") as e:
        from_pretrained("gpt2-tiny", source="hf")  # model.safetensors is larger than the disk
    assert "network" not in str(e.value).lower() and "\n" not in str(e.value)


# one cache's commands and their answers -----------------------------------------------------------------------------
def test_rm_of_a_dtype_that_is_not_stored_says_so(hub_env, server, capsys):
    from_pretrained("gpt2-tiny")
    assert main(["cache", "rm", "gpt2-tiny", "--dtype", "bfloat16", "-y"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-tiny is cached, but no bfloat16 weights of it are stored" in out
    assert main(["cache", "rm", "gpt2-medium", "-y"]) == 0 and "gpt2-medium is not in the cache" in capsys.readouterr().out


def test_the_list_table_stays_aligned_with_many_dtypes(hub_env, server, capsys):
    for dtype in ("float32", "bfloat16", "float16"):
        from_pretrained("gpt2-tiny", dtype=dtype)
    assert main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[1], lines[2]
    assert row.index("complete") == header.index("status") and "float32,bfloat16,float16" in row
    assert row.index("float32,") == header.index("dtypes")


def test_rm_include_hf_frees_what_it_says_and_leaves_other_revisions_links_whole(hub_env, server, tmp_path,
                                                                                 monkeypatch):
    import huggingface_hub.constants as c

    from gpt2hub.inventory import plan_removal, remove

    hf = tmp_path / "hf_home" / "hub"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hf))
    from_pretrained("gpt2-tiny", source="hf")
    repo = hf / f"models--{TINY.hf_repo.replace('/', '--')}"
    other = repo / "snapshots" / ("9" * 40)  # another revision in the user's Hugging Face cache sharing a blob
    other.mkdir()
    (other / "vocab.json").symlink_to(os.readlink(repo / "snapshots" / COMMIT / "vocab.json"))
    blobs = {p: p.stat().st_size for p in (repo / "blobs").iterdir()}
    own = sum(p.stat().st_size for p in (hub_env / "hf/tiny" / COMMIT).rglob("*") if p.is_file())
    removed = remove(plan_removal(hub_env, "gpt2-tiny", "hf", include_hf=True))
    gone = sum(size for p, size in blobs.items() if not p.exists())
    assert [p for p in blobs if p.exists()] == [(other / "vocab.json").resolve()]  # still needed by the other link
    assert (other / "vocab.json").read_bytes() and removed.bytes == gone + own
    assert not (hub_env / "hf/tiny").exists()  # its refs gone with its only commit


# the roles apart ----------------------------------------------------------------------------------------------------
class FolderOfOpenAIFiles:
    """A new transport written outside gpt2hub: OpenAI's files copied from a local folder (think of an object store
    mounted somewhere). It only brings bytes and hands them to the gate."""

    key = "openai"
    format = gpt2hub.formats.FORMATS["openai"]
    serves_offline = False

    def __init__(self, spec, folder):
        self.spec, self.folder = spec, folder

    def identity(self, cache):
        return EntryKey("openai", self.spec.size)

    def external(self):
        return None

    def published(self):
        return OpenAIMirrors(self.spec, progress=False, bases=[]).published()

    def fetch(self, entry, gate, force):
        part = entry.raw_path(gate.name).with_name(gate.name + ".copying")
        part.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.folder / gate.name, part)
        accepted = gate(part)  # refuses what is not the published file
        part.rename(entry.raw_path(gate.name))
        return accepted.at(url=f"file://{self.folder / gate.name}")

    def done(self):
        pass


def test_a_new_transport_plugs_in_and_cannot_skip_the_published_file_check(hub_env, tiny_folder, tmp_path):
    transport = FolderOfOpenAIFiles(TINY, tiny_folder[0])
    hub = Hub(TINY, transport, Cache(hub_env), offline_=False, progress=False)
    model = hub.load(storage_for("bfloat16"), torch.device("cpu"))
    assert torch.equal(model.tok_emb.weight, from_pretrained(tiny_folder[0], dtype="bfloat16").tok_emb.weight)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder[0], bad)
    (bad / "encoder.json").write_text('{"a": 1}')  # not the pinned vocabulary
    other = Hub(TINY, FolderOfOpenAIFiles(TINY, bad), Cache(tmp_path / "other-cache"), offline_=False, progress=False)
    with pytest.raises(IntegrityError, match="expected 1042301"):  # the pinned file's size, checked first
        other.files(("encoder.json",))
    assert "encoder.json" not in other.entry.records()
    with pytest.raises(TypeError, match="Gate"):  # nothing but a gate's Accepted is recorded
        other.entry.record({"size": 8, "crc32c": "00000000"})
