"""The load path under attack: links out of the cache, traversal in records, lying and dead mirrors, bad files."""

import hashlib
import io
import json
import logging
import os
import socket
import threading
from dataclasses import replace

import pytest
import torch
from conftest import TINY
from server import COMMIT, Fault

import gpt2hub
from gpt2hub import ConversionError, DownloadError, IntegrityError, from_pretrained
from gpt2hub.checks import verify
from gpt2hub.inventory import model_entry
from gpt2hub.registry import OPENAI_FILES, register, resolve
from gpt2hub.synthetic import CHECKPOINT_FILE

DATA, INDEX = "model.ckpt.data-00000-of-00001", "model.ckpt.index"
HTML = b"<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>\n"


def _gets(server, name: str) -> list:
    return [r for r in server.served.requests("GET") if r[1] == f"/{TINY.size}/{name}"]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None])


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "outside" / "precious.bin"
    path.parent.mkdir()
    path.write_bytes(b"the user's own file, outside the cache\n" * 10)
    return path


def test_a_symlinked_raw_file_is_replaced_never_followed(hub_env, server, victim):
    first = _logits(from_pretrained("gpt2-tiny"))
    raw = hub_env / "openai/tiny/raw"
    for name in (DATA, "hparams.json", "vocab.bpe"):
        (raw / name).unlink()
        (raw / name).symlink_to(victim)
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), first)
    assert victim.read_bytes() == b"the user's own file, outside the cache\n" * 10
    assert all(not (raw / n).is_symlink() for n in OPENAI_FILES)


def test_a_link_to_the_right_bytes_outside_the_cache_is_not_trusted_or_followed(hub_env, server, tmp_path):
    from_pretrained("gpt2-tiny")
    raw = hub_env / "openai/tiny/raw"
    outside = tmp_path / "copy-of-data"
    outside.write_bytes((raw / DATA).read_bytes())
    (raw / DATA).unlink()
    (raw / DATA).symlink_to(outside)
    problems = verify(model_entry(hub_env, "tiny"))
    assert [p.name for p in problems] == [DATA] and "not a regular file" in problems[0].what
    from_pretrained("gpt2-tiny")
    assert outside.exists() and not (raw / DATA).is_symlink() and len(_gets(server, DATA)) == 2


def test_traversal_in_files_json_and_manifests_touches_nothing_outside(hub_env, server, victim, caplog):
    first = _logits(from_pretrained("gpt2-tiny", dtype="bfloat16"))
    from_pretrained("gpt2-tiny")
    m = hub_env / "openai/tiny"
    files = json.loads((m / "files.json").read_text())
    files["../../../../outside/precious.bin"] = files[DATA]
    files[DATA] = {**files[DATA], "path": str(victim), "size": victim.stat().st_size}
    (m / "files.json").write_text(json.dumps(files))
    for dtype, weights in (("float32", f"../../../../{victim.parent.name}/{victim.name}"),
                           ("bfloat16", str(victim))):
        manifest = json.loads((m / f"converted/{dtype}.json").read_text())
        (m / f"converted/{dtype}.json").write_text(json.dumps({**manifest, "weights": weights}))
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        assert torch.equal(_logits(from_pretrained("gpt2-tiny", dtype="bfloat16")), first)
        from_pretrained("gpt2-tiny")
    assert victim.read_bytes() == b"the user's own file, outside the cache\n" * 10
    assert "ignoring the malformed or foreign record" in caplog.text
    assert set(json.loads((m / "files.json").read_text())) == set(OPENAI_FILES)


@pytest.mark.parametrize("damage", ["a list", "a number", "wrong types", "not json"])
def test_damaged_records_are_ignored_and_rebuilt(hub_env, server, damage):
    first = _logits(from_pretrained("gpt2-tiny"))
    m = hub_env / "openai/tiny"
    text = {"a list": "[1, 2]", "a number": json.dumps({DATA: 7}), "not json": "{oops",
            "wrong types": json.dumps({DATA: {"size": "big", "crc32c": 5}})}[damage]
    (m / "files.json").write_text(text)
    (m / "converted/float32.json").write_text(json.dumps({"format": 2, "kind": [], "bytes": "x"}))
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), first)
    assert len(_gets(server, DATA)) <= 2 and json.loads((m / "files.json").read_text())[DATA]["size"] > 0


@pytest.mark.parametrize("name", ["hparams.json", INDEX, "checkpoint", "encoder.json"])
@pytest.mark.parametrize("bad", ["html", "truncated"])
def test_a_bad_small_file_is_rejected_on_arrival_and_fetched_again(hub_env, server, tiny_folder, name, bad):
    good = (tiny_folder[0] / name).read_bytes()
    body = HTML if bad == "html" else good[: len(good) // 2]
    server.served.fault(f"/tiny/{name}", Fault("body", body=body))
    model = from_pretrained("gpt2-tiny")
    assert (hub_env / "openai/tiny/raw" / name).read_bytes() == good
    assert len(_gets(server, name)) == 2 and len(_gets(server, DATA)) == 1  # the data file is never blamed
    assert torch.equal(_logits(model), _logits(from_pretrained(tiny_folder[0])))


def test_a_file_bad_on_every_mirror_is_an_error_naming_it_and_never_recorded(hub_env, server, sleeps):
    server.served.fault("/tiny/hparams.json", Fault("body", body=HTML, times=10))
    with pytest.raises(IntegrityError, match=r"hparams.json.*not JSON.*GPT2HUB_OPENAI_URL") as e:
        from_pretrained("gpt2-tiny")
    assert "\n" not in str(e.value) and str(hub_env) in str(e.value)
    files = json.loads((hub_env / "openai/tiny/files.json").read_text())
    assert "hparams.json" not in files and not (hub_env / "openai/tiny/raw/hparams.json").exists()
    assert len(_gets(server, "hparams.json")) == 2 and sleeps == []


def test_a_damaged_cached_index_is_fetched_again_alone(hub_env, server, caplog):
    first = _logits(from_pretrained("gpt2-tiny"))
    index = hub_env / "openai/tiny/raw" / INDEX
    data = bytearray(index.read_bytes())
    data[len(data) // 3] ^= 0xFF
    index.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        assert torch.equal(_logits(from_pretrained("gpt2-tiny")), first)
    assert INDEX in caplog.text and len(_gets(server, INDEX)) == 2 and len(_gets(server, DATA)) == 1


@pytest.mark.parametrize("fault", [Fault("reset", after=300_000), Fault("stall", after=300_000, delay=3.0)])
def test_a_reset_or_a_stall_mid_body_is_resumed_in_the_same_call(hub_env, server, monkeypatch, fault, sleeps):
    monkeypatch.setenv("GPT2HUB_READ_TIMEOUT", "0.5")
    server.served.fault(f"/tiny/{DATA}", fault)
    model = from_pretrained("gpt2-tiny")
    ranges = [r for _, _, r in _gets(server, DATA)]
    assert ranges[0] is None and len(ranges) == 2 and len(sleeps) == 1  # one retry, in the same call
    if fault.kind == "stall":  # the bytes before the stall were kept: resumed with a Range request
        assert int(ranges[1].split("=")[1].rstrip("-")) == 300_000
    assert model.tok_emb.weight.shape[0] == TINY.vocab_size


def test_no_network_at_all_fails_each_mirror_once_without_backoff(hub_env, monkeypatch, sleeps):
    asked = []

    def no_dns(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", "http://mirror-a.invalid http://mirror-b.invalid")
    with pytest.raises(DownloadError) as e:
        from_pretrained("gpt2-tiny")
    msg = str(e.value)
    assert "mirror-a.invalid" in msg and "mirror-b.invalid" in msg and "GPT2HUB_OFFLINE=1" in msg
    assert str(hub_env) in msg and "keeps" not in msg and "\n" not in msg
    assert sorted(asked) == ["mirror-a.invalid", "mirror-b.invalid"] and sleeps == []


@pytest.mark.parametrize("first", ["dead", "lying", "5xx"])
def test_a_dead_or_lying_first_mirror_hands_over_to_the_second(hub_env, server, monkeypatch, tiny_folder, first,
                                                               sleeps):
    for name in OPENAI_FILES:
        if first == "lying":
            server.served.files[f"/bad/tiny/{name}"] = HTML
        elif first == "5xx":
            server.served.fault(f"/bad/tiny/{name}", Fault("status", status=500, times=100))
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", f"{server.url}/bad {server.url}")
    model = from_pretrained("gpt2-tiny")
    assert torch.equal(_logits(model), _logits(from_pretrained(tiny_folder[0])))
    bad_gets = server.served.requests("GET", "/bad/")
    if first == "5xx":  # retried a few times for the first file, then skipped for the rest of the call
        assert len(bad_gets) == 4 and sum(sleeps) < 2
    else:
        assert len(bad_gets) <= 2 * len(OPENAI_FILES) and sleeps == []
    for name in OPENAI_FILES:
        assert len(_gets(server, name)) == 1


@pytest.fixture
def pinned(tiny_folder, server):
    """The tiny model with every published file pinned, as the real 124M's are; the served hparams.json differs."""
    pins = {n: hashlib.sha256((tiny_folder[0] / n).read_bytes()).hexdigest() for n in OPENAI_FILES}
    pins["hparams.json"] = "0" * 64
    for n in OPENAI_FILES:
        server.served.files[f"/tinypin/{n}"] = (tiny_folder[0] / n).read_bytes()
    return register(replace(TINY, name="gpt2-tiny-pinned", size="tinypin", hf_repo="test-org/gpt2-tiny-pinned",
                            sha256={"openai": pins}))


def test_pinned_sha256_refuses_other_weights_unless_opted_out_loudly(hub_env, server, pinned, monkeypatch, caplog):
    with pytest.raises(IntegrityError) as e:
        from_pretrained("gpt2-tiny-pinned")
    msg = str(e.value)
    assert "hparams.json" in msg and "0" * 64 in msg and f"{server.url}/tinypin/hparams.json" in msg
    assert "GPT2HUB_IGNORE_PINS=1" in msg
    assert hashlib.sha256(server.served.files["/tinypin/hparams.json"]).hexdigest() in msg
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        from_pretrained("gpt2-tiny-pinned")
        said = caplog.text
        caplog.clear()
        from_pretrained("gpt2-tiny-pinned")  # warm: said once per process, not at every load
    assert "hparams.json" in said and "GPT2HUB_IGNORE_PINS" in said and said.count("\n") == 1 and len(said) < 400
    assert caplog.text == ""
    monkeypatch.delenv("GPT2HUB_IGNORE_PINS")
    with pytest.raises(IntegrityError, match="hparams.json.*GPT2HUB_IGNORE_PINS"):
        from_pretrained("gpt2-tiny-pinned")  # kept under the opt-out, refused once it is gone


def test_the_real_124m_pins_refuse_synthetic_weights_and_match_the_reproducible_files(hub_env, server, tmp_path):
    spec = resolve("gpt2-small")
    pins = spec.expected_sha256("openai")
    assert hashlib.sha256(CHECKPOINT_FILE.encode()).hexdigest() == pins["checkpoint"]
    assert hashlib.sha256((json.dumps(spec.hparams(), indent=2) + "\n").encode()).hexdigest() == pins["hparams.json"]
    server.served.files["/124M/model.ckpt.meta"] = b"random test bytes, not OpenAI's graph"
    with pytest.raises(IntegrityError, match="model.ckpt.meta.*4668c448.*GPT2HUB_IGNORE_PINS"):
        gpt2hub.hub.open_hub("gpt2-small").files(("model.ckpt.meta",))


@pytest.mark.parametrize("n_layer,why", [(1, "n_layer=1"), (3, "n_layer=3"), (0, "positive integer"),
                                          (-3, "positive integer"), (12.9, "positive integer"),
                                          (True, "positive integer"), (None, "positive integer")])
def test_a_folder_whose_hparams_do_not_fit_its_tensors_is_refused(tiny_folder, tmp_path, n_layer, why):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_folder[0].iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "hparams.json").unlink()
    (folder / "hparams.json").write_text(json.dumps({**TINY.hparams(), "n_layer": n_layer}))
    with pytest.raises((IntegrityError, ConversionError), match=why) as e:
        from_pretrained(folder)
    assert "hparams.json" in str(e.value)


def test_a_fifo_in_a_folder_is_refused_without_opening_it(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for f in tiny_folder[0].iterdir():
        if f.name != DATA:
            (folder / f.name).symlink_to(f)
    os.mkfifo(folder / DATA)
    outcome: list = []

    def load():
        try:
            from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - the outcome is checked below
            outcome.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():  # it opened the FIFO and waits for a writer: unblock it, then fail
        with open(folder / DATA, "wb"):
            pass
        pytest.fail("from_pretrained opened a FIFO")
    assert outcome and "not a regular file" in str(outcome[0]) and DATA in str(outcome[0])


def test_a_folder_where_a_cached_file_belongs_is_an_error_naming_it(hub_env, server):
    from_pretrained("gpt2-tiny")
    raw = hub_env / "openai/tiny/raw"
    (raw / "vocab.bpe").unlink()
    (raw / "vocab.bpe").mkdir()
    with pytest.raises(gpt2hub.CacheError, match="vocab.bpe is a folder"):
        from_pretrained("gpt2-tiny")


def test_revision_passes_through_to_the_hub_and_is_refused_for_openai(hub_env, server, monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    model = from_pretrained("gpt2-tiny", source="hf", revision="main")
    gets = [p for _, p, _ in server.served.requests("GET")]
    assert "/test-org/gpt2-tiny/resolve/main/config.json" in gets  # the revision resolved to its commit once,
    assert f"/test-org/gpt2-tiny/resolve/{COMMIT}/model.safetensors" in gets  # then every file of that commit
    assert model.tied
    with pytest.raises(ValueError, match="revision"):
        from_pretrained("gpt2-tiny", revision="v1")


def test_the_load_path_modules_do_not_import_the_hub():
    import subprocess
    import sys

    code = ("import sys, gpt2hub.transports, gpt2hub.formats, gpt2hub.storage, gpt2hub.cache, gpt2hub.names; "
            "print(sorted(m for m in sys.modules if m in ('gpt2hub.hub', 'gpt2hub.cli', 'gpt2hub.bench')))")
    # importing a submodule runs gpt2hub/__init__, which imports hub: check the modules' own imports instead
    for module in ("transports", "formats", "storage", "cache", "checks", "arrival", "published", "names", "download",
                   "registry", "config", "settings", "inventory", "streaming", "files"):
        text = (gpt2hub.__path__[0] + f"/{module}.py")
        source = open(text).read()
        assert "from .hub" not in source and "from .cli" not in source and "from .bench" not in source, module
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_one_progress_bar_counts_the_bytes_of_every_file(hub_env, server, monkeypatch, tiny_folder):
    from tqdm import tqdm as base

    bars = []

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "delay": 0})
            bars.append(self)

    monkeypatch.delenv("GPT2HUB_DISABLE_PROGRESS_BARS")
    monkeypatch.setattr(gpt2hub.transports, "tqdm", Recording)
    monkeypatch.setattr(gpt2hub.hub, "tqdm", Recording)  # the verifying bar, counted apart
    server.served.fault(f"/tiny/{DATA}", Fault("drop", after=200_000))  # a resumed file is counted once
    gpt2hub.download_files("gpt2-tiny")
    downloads = [b for b in bars if b.desc.startswith("downloading")]
    total = sum((tiny_folder[0] / n).stat().st_size for n in OPENAI_FILES)
    assert len(downloads) == 1 and downloads[0].desc == "downloading gpt2-tiny"
    assert downloads[0].total == total and downloads[0].n == total
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # Hugging Face's switch silences gpt2hub's bars too
    bars.clear()
    gpt2hub.download_files("gpt2-tiny", force_download=True)
    assert bars == []


@pytest.mark.parametrize("target", ["converted", "index"])
def test_damage_that_keeps_size_and_timestamp_is_repaired_when_reading_fails(hub_env, server, target, caplog):
    dtype = "bfloat16" if target == "converted" else "float32"
    first = _logits(from_pretrained("gpt2-tiny", dtype=dtype))
    m = hub_env / "openai/tiny"
    path = m / "converted/bfloat16.safetensors" if target == "converted" else m / "raw" / INDEX
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[9:13] = b"\xff\xfe\xfd\xfc"  # inside the safetensors header / the index's first block
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the quick check trusts size and mtime
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        assert torch.equal(_logits(from_pretrained("gpt2-tiny", dtype=dtype)), first)
    assert "preparing the weights again" in caplog.text


def test_garbage_hugging_face_files_are_named_and_fetched_afresh(hub_env, server, monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    for name in ("config.json", "vocab.json", "merges.txt"):
        key = f"/hf/{TINY.hf_repo}/{name}"
        good, server.served.files[key] = server.served.files[key], HTML  # the Hub itself serves a bad file
        with pytest.raises(IntegrityError, match=rf"{name}.*not a valid {name}") as e:
            from_pretrained("gpt2-tiny", source="hf") if name == "config.json" else gpt2hub.load_tokenizer(
                "gpt2-tiny", source="hf")
        assert "\n" not in str(e.value)
        server.served.files[key] = good
    from_pretrained("gpt2-tiny", source="hf")  # each bad file was deleted with its blob: fetched afresh
    assert gpt2hub.load_tokenizer("gpt2-tiny", source="hf").encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_a_folder_without_vocabulary_files_names_them(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("hparams.json", "checkpoint", INDEX, DATA):
        (folder / name).symlink_to(tiny_folder[0] / name)
    with pytest.raises(DownloadError, match="encoder.json is missing.*vocab.bpe"):
        gpt2hub.load_tokenizer(folder)
