"""Preparing the weights while OpenAI's data file downloads (gpt2hub.streaming): the same weights as preparing them
afterwards, whatever the download goes through, and never a say in what is accepted. How the weights were prepared
is the manifest's "prepared" field (and `-v`'s log line): these tests read it rather than patching the code."""

import json
import logging
import os
import random
import subprocess
import threading
import time
from dataclasses import replace

import pytest
import torch
from conftest import TINY
from server import Fault

import gpt2hub
from gpt2hub import CacheError, IntegrityError, download, from_pretrained
from gpt2hub.checks import verify
from gpt2hub.convert import VariableConverter, openai_state_dict, read_hparams
from gpt2hub.inventory import model_entry
from gpt2hub.registry import OPENAI_FILES, register
from gpt2hub.safetensors_file import SafetensorsWriter, load_safetensors, save_state_dict
from gpt2hub.streaming import StreamedWeights, plan
from gpt2hub.tf_checkpoint import TFCheckpoint, read_index

DATA, INDEX = "model.ckpt.data-00000-of-00001", "model.ckpt.index"


def _cfg(folder):
    return read_hparams(folder / "hparams.json")


def _reference(folder, dtype):
    """The weights as preparing them from the whole file makes them (the path that existed before streaming)."""
    with TFCheckpoint(folder / "model.ckpt") as ckpt:
        return openai_state_dict(lambda n: ckpt.read(f"model/{n}"), _cfg(folder), dtype)


def _stored(cache, dtype):
    return load_safetensors(model_entry(cache, TINY.name).stored_path(dtype))


def _assert_same(sd, ref):
    assert sd.keys() == ref.keys()
    for k in ref:
        assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k


def _converted_dir(cache):
    return model_entry(cache, TINY.name).converted


def _prepared(cache, dtype) -> str:
    """How the cache says the weights of `dtype` were prepared (the manifest's "prepared")."""
    return json.loads((_converted_dir(cache) / f"{dtype}.json").read_text())["prepared"]


def _temporaries(cache) -> list[str]:
    folder = _converted_dir(cache)
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] if folder.is_dir() else []


def _data_gets(server) -> list:
    return [r for r in server.served.requests("GET") if r[1].endswith(DATA)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_cold_16bit_load_converts_while_downloading_to_the_same_weights(hub_env, tiny_folder, dtype, caplog):
    with caplog.at_level(logging.INFO, logger="gpt2hub"):
        model = from_pretrained("gpt2-tiny", dtype=dtype)
    assert "(converted while downloading)" in caplog.text and _prepared(hub_env, dtype) == "converted while downloading"
    ref = _reference(tiny_folder[0], getattr(torch, dtype))
    _assert_same(_stored(hub_env, dtype), ref)
    assert torch.equal(model.tok_emb.weight, ref["tok_emb.weight"])
    manifest = json.loads((_converted_dir(hub_env) / f"{dtype}.json").read_text())
    assert manifest["kind"] == "converted"
    assert _temporaries(hub_env) == []
    assert not verify(model_entry(hub_env, TINY.name), OPENAI_FILES, (dtype,))


def test_a_cold_float32_load_checks_every_tensor_while_downloading(hub_env, tiny_folder):
    model = from_pretrained("gpt2-tiny")
    assert _prepared(hub_env, "float32") == "checked while downloading"
    assert torch.equal(model.tok_emb.weight, _reference(tiny_folder[0], torch.float32)["tok_emb.weight"])
    record = json.loads((hub_env / "openai/tiny/files.json").read_text())[DATA]
    assert record["tensors"] == "checked"


def test_the_data_file_is_fetched_after_its_index(hub_env, server):
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    order = [r[1].rsplit("/", 1)[1] for r in server.served.requests("GET") if f"/{TINY.size}/" in r[1]]
    assert order.index(INDEX) < order.index(DATA) and order.index("hparams.json") < order.index(DATA)


@pytest.mark.parametrize("fault", [Fault("reset", after=300_001), Fault("ignore_range"), Fault("drop", after=123_457)])
def test_resumed_or_restarted_downloads_still_convert_to_the_same_weights(hub_env, server, tiny_folder, sleeps, fault):
    if fault.kind == "ignore_range":  # the resumed request is answered from the first byte: the tap starts over
        server.served.fault(f"/{TINY.size}/{DATA}", Fault("reset", after=200_003))
    server.served.fault(f"/{TINY.size}/{DATA}", fault)
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert len(_data_gets(server)) == 2 and _prepared(hub_env, "bfloat16") == "converted while downloading"
    _assert_same(_stored(hub_env, "bfloat16"), _reference(tiny_folder[0], torch.bfloat16))


def test_a_partial_file_left_by_a_killed_process_is_read_back_into_the_conversion(hub_env, server, tiny_folder):
    raw = model_entry(hub_env, TINY.name).raw
    raw.mkdir(parents=True)
    (raw / f"{DATA}.99999.incomplete").write_bytes((tiny_folder[0] / DATA).read_bytes()[:250_001])
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert [r[2] for r in _data_gets(server)] == ["bytes=250001-"]  # resumed, not fetched again
    assert _prepared(hub_env, "bfloat16") == "converted while downloading"
    _assert_same(_stored(hub_env, "bfloat16"), _reference(tiny_folder[0], torch.bfloat16))


def test_a_corrupt_tensor_stops_streaming_and_the_file_is_fetched_again_and_converted_as_it_arrives(
        hub_env, server, tiny_folder, monkeypatch, caplog):
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")  # a size with pins would refuse the bad file before any check
    bad = bytearray((tiny_folder[0] / DATA).read_bytes())
    bad[len(bad) // 2] ^= 0x40
    server.served.fault(f"/{TINY.size}/{DATA}", Fault("body", body=bytes(bad)))
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        model = from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert "crc32c" in caplog.text and DATA in caplog.text  # refused on arrival, naming the file, fetched once more
    assert len(_data_gets(server)) == 2 and _prepared(hub_env, "bfloat16") == "converted while downloading"
    _assert_same(_stored(hub_env, "bfloat16"), _reference(tiny_folder[0], torch.bfloat16))
    assert torch.equal(model.tok_emb.weight, _reference(tiny_folder[0], torch.bfloat16)["tok_emb.weight"])


@pytest.fixture
def small_disk(hub_env):
    """Mount a tmpfs on the cache's converted/ folder: `small_disk(options)` (size=64k fills up mid-write,
    nr_inodes=1 refuses to create a file); unmounted after. Skipped where mounting is not allowed."""
    mounted = []

    def make(options: str):
        folder = _converted_dir(hub_env)
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode()[:100]}")
        mounted.append(folder)

    def unmount():
        while mounted:
            subprocess.run(["umount", str(mounted.pop())], check=True)

    make.unmount = unmount
    yield make
    unmount()


@pytest.mark.parametrize("options", ["size=64k", "nr_inodes=2"], ids=["full mid-write", "no file can be made"])
def test_a_full_disk_while_converting_never_fails_the_download(hub_env, server, tiny_folder, small_disk, options):
    small_disk(options)
    with pytest.raises(CacheError, match=r"no space left on the device holding .*converted.*free some space") as e:
        from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert "\n" not in str(e.value)
    assert DATA in json.loads((hub_env / "openai/tiny/files.json").read_text())  # the download itself went through
    assert _temporaries(hub_env) == []  # the tap gave its file (and its disk space) back when it failed
    small_disk.unmount()
    model = from_pretrained("gpt2-tiny", dtype="bfloat16")  # space freed: converted, nothing downloaded again
    assert len(_data_gets(server)) == 1 and _prepared(hub_env, "bfloat16") == "converted reading the file once"
    assert torch.equal(model.tok_emb.weight, _reference(tiny_folder[0], torch.bfloat16)["tok_emb.weight"])


def test_a_download_that_fails_leaves_no_converted_file(hub_env, server, sleeps):
    server.served.fault(f"/{TINY.size}/{DATA}", Fault("status", status=404))
    with pytest.raises(gpt2hub.DownloadError):
        from_pretrained("gpt2-tiny", dtype="bfloat16")
    folder = _converted_dir(hub_env)
    assert not folder.exists() or [p.name for p in folder.iterdir()] == []


def test_a_file_refused_by_its_pin_is_never_used_even_if_it_converted_cleanly(hub_env, server, tiny_folder):
    for f in tiny_folder[0].iterdir():
        server.served.files[f"/tinypindata/{f.name}"] = f.read_bytes()
    pinned = register(replace(TINY, name="gpt2-tiny-pin-data", size="tinypindata", hf_repo="test-org/gpt2-tiny-pin-data",
                              sha256={"openai": {DATA: "0" * 64}}))
    with pytest.raises(IntegrityError, match="pinned"):
        from_pretrained(pinned.name, dtype="bfloat16")
    folder = model_entry(hub_env, pinned.name).converted
    assert not folder.exists() or [p.name for p in folder.iterdir()] == []


def _mid_download(server, then, after: int = 600_000) -> None:
    """Run `then(temporary file)` on this machine while the data file is half downloaded: once the tap's converted
    temporary file exists (the server waits, holding the rest of the body)."""
    def hook():
        folder = _converted_dir(server.cache)
        deadline = time.monotonic() + 20
        while not [p for p in folder.glob(".bfloat16.safetensors.*.tmp")] if folder.is_dir() else True:
            assert time.monotonic() < deadline, "the tap never made its temporary file"
            time.sleep(0.01)
        then(next(folder.glob(".bfloat16.safetensors.*.tmp")))

    server.served.fault(f"/{TINY.size}/{DATA}", Fault("hook", after=after, hook=hook))


def test_a_converted_file_removed_before_it_is_used_is_converted_again(hub_env, server, tiny_folder):
    """As `cache prune` may remove it once the lock file was deleted (see test_attacks)."""
    server.cache = hub_env
    _mid_download(server, lambda tmp: tmp.unlink())
    model = from_pretrained("gpt2-tiny", dtype="bfloat16")  # not a FileNotFoundError: converted after the download
    assert _prepared(hub_env, "bfloat16") == "converted from the mapped file"
    _assert_same(_stored(hub_env, "bfloat16"), _reference(tiny_folder[0], torch.bfloat16))
    assert torch.equal(model.tok_emb.weight, _reference(tiny_folder[0], torch.bfloat16)["tok_emb.weight"])
    assert not verify(model_entry(hub_env, TINY.name), OPENAI_FILES, ("bfloat16",))


def test_a_converted_file_replaced_before_it_is_used_is_not_used(hub_env, server, tiny_folder, caplog):
    def replace_it(tmp):
        tmp.unlink()
        tmp.write_bytes(b"not what the tap wrote")

    server.cache = hub_env
    _mid_download(server, replace_it)
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert caplog.text == "" and _prepared(hub_env, "bfloat16") == "converted from the mapped file"
    _assert_same(_stored(hub_env, "bfloat16"), _reference(tiny_folder[0], torch.bfloat16))
    assert not verify(model_entry(hub_env, TINY.name), OPENAI_FILES, ("bfloat16",))


def test_a_link_planted_at_converted_during_the_download_is_never_written_through(hub_env, server, tiny_folder,
                                                                                  tmp_path):
    """After the last check of the cache's folders (the index recorded) and before the first tensor is written."""
    outside = tmp_path / "outside"
    outside.mkdir()

    def plant():
        folder = _converted_dir(hub_env)
        if folder.is_dir():
            folder.rmdir()
        folder.symlink_to(outside)

    server.served.fault(f"/{TINY.size}/{DATA}", Fault("hook", after=0, hook=plant))
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert list(outside.iterdir()) == []
    _assert_same(_stored(hub_env, "bfloat16"), _reference(tiny_folder[0], torch.bfloat16))
    assert not _converted_dir(hub_env).is_symlink()


def _tap_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("gpt2hub-tap")]


def test_no_tap_thread_outlives_a_load_that_succeeds_or_fails(hub_env, server, sleeps):
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert _tap_threads() == []
    server.served.fault(f"/{TINY.size}/{DATA}", Fault("status", status=404))
    with pytest.raises(gpt2hub.DownloadError):
        from_pretrained("gpt2-tiny", dtype="float16", force_download=True)
    assert _tap_threads() == []


def test_an_interrupt_mid_download_ends_the_taps_and_leaves_no_converted_file(hub_env, server, tiny_folder,
                                                                              monkeypatch):
    real, reads = download._read, []

    def read(resp):
        reads.append(resp.url)
        if sum(DATA in url for url in reads) == 3:
            raise KeyboardInterrupt
        return real(resp)

    monkeypatch.setattr(download, "_read", read)
    with pytest.raises(KeyboardInterrupt):
        from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert _tap_threads() == []
    assert _temporaries(hub_env) == []
    monkeypatch.setattr(download, "_read", real)
    from_pretrained("gpt2-tiny", dtype="bfloat16")  # resumed, and converted as the rest arrives
    _assert_same(_stored(hub_env, "bfloat16"), _reference(tiny_folder[0], torch.bfloat16))


def test_files_downloaded_first_are_converted_by_the_same_converter_reading_the_file(hub_env, tiny_folder, caplog):
    gpt2hub.download_files("gpt2-tiny")  # no dtype, so nothing streams
    with caplog.at_level(logging.INFO, logger="gpt2hub"):
        from_pretrained("gpt2-tiny", dtype="float16")  # read front to back, one tensor in memory at a time
    _assert_same(_stored(hub_env, "float16"), _reference(tiny_folder[0], torch.float16))
    assert not verify(model_entry(hub_env, TINY.name), OPENAI_FILES, ("float16",))
    assert "(converted reading the file once)" in caplog.text and _prepared(hub_env, "float16") == \
        "converted reading the file once"


def test_a_damaged_cached_data_file_is_still_blamed_when_converting_it_later(hub_env, server, tiny_folder, caplog):
    gpt2hub.download_files("gpt2-tiny")
    data = model_entry(hub_env, TINY.name).raw_path(DATA)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    st = data.stat()
    data.chmod(0o644)  # the cache keeps its files read-only: an accidental write fails for anyone but root
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and time kept: only reading can tell
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        model = from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert "crc32c" in caplog.text and DATA in caplog.text
    assert len([r for r in server.served.requests("GET") if r[1].endswith(DATA)]) == 2  # fetched once more
    assert torch.equal(model.tok_emb.weight, _reference(tiny_folder[0], torch.bfloat16)["tok_emb.weight"])


# -- the tap alone, fed in pieces of every size ------------------------------------------------------------------------
def _tap(folder, tmp_path, dtype=torch.bfloat16):
    entries, shards = read_index(folder / INDEX)
    pieces = plan(entries, _cfg(folder))
    assert shards == 1 and pieces is not None
    return StreamedWeights(pieces, _cfg(folder), dtype, tmp_path, "bfloat16.safetensors")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_tap_gives_the_same_file_for_any_chunking(tiny_folder, tmp_path, seed):
    folder = tiny_folder[0]
    data = (folder / DATA).read_bytes()
    tap = _tap(folder, tmp_path)
    rng, pos = random.Random(seed), 0
    while pos < len(data):
        n = rng.choice([1, 3, 4, 7, 4096, 65_537, 300_000])
        tap.update(data[pos:pos + n])
        pos += n
    made = tap.result(folder / DATA)
    assert made is not None
    _assert_same(load_safetensors(made[0]), _reference(folder, torch.bfloat16))
    assert made[1] == gpt2hub.files.crc32c_file(made[0])
    tap.close()  # the file was not moved into place: removed
    assert not made[0].exists() and list(tmp_path.iterdir()) == []


def test_the_tap_refuses_what_it_did_not_see_whole(tiny_folder, tmp_path):
    folder = tiny_folder[0]
    data = (folder / DATA).read_bytes()
    tap = _tap(folder, tmp_path)
    tap.update(data[:-1])
    assert not tap.complete(folder / DATA) and tap.result(folder / DATA) is None
    tap.update(data[-1:] + b"x")  # one byte more than the file the download accepted
    assert not tap.complete(folder / DATA)
    tap.close()
    assert list(tmp_path.iterdir()) == []


def test_an_index_that_does_not_fit_the_hyperparameters_gives_no_plan(tiny_folder):
    entries, _ = read_index(tiny_folder[0] / INDEX)
    cfg = _cfg(tiny_folder[0])
    assert plan(entries, {**cfg, "n_layers": cfg["n_layers"] + 1}) is None
    assert plan({k: v for k, v in entries.items() if not k.endswith("wpe")}, cfg) is None
    assert plan(entries, {**cfg, "emb_dim": cfg["emb_dim"] * 2}) is None


def test_the_converter_gives_shapes_on_meta_tensors_and_the_embedding_is_only_cast():
    cfg = {"emb_dim": 8, "n_layers": 1}
    conv = VariableConverter(cfg, torch.bfloat16)
    wte = torch.randn(50, 8)
    out = conv("wte", wte, ("tok_emb.weight",), "keep")["tok_emb.weight"]
    assert out.is_contiguous() and torch.equal(out, wte.to(torch.bfloat16))
    meta = conv("h0/attn/c_attn/w", torch.empty(8, 24, device="meta"), ("q", "k", "v"), "qkv")
    assert [tuple(t.shape) for t in meta.values()] == [(8, 8)] * 3 and all(t.is_meta for t in meta.values())


def test_the_writer_refuses_tensors_out_of_order_or_missing(tmp_path):
    sd = {"a": torch.zeros(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    crc = save_state_dict(sd, tmp_path / "ok.safetensors")
    assert crc == gpt2hub.files.crc32c_file(tmp_path / "ok.safetensors")
    _assert_same(load_safetensors(tmp_path / "ok.safetensors"), sd)
    with open(tmp_path / "w", "wb") as f:
        w = SafetensorsWriter(f, gpt2hub.safetensors_file.layout_of(sd))
        with pytest.raises(ValueError, match="expected 'a'"):
            w.write("b", sd["b"])
        with pytest.raises(ValueError, match="expected 'a'"):
            w.write("a", torch.zeros(3, 2))
        w.write("a", sd["a"])
        with pytest.raises(ValueError, match="'b' was never written"):
            w.finish()


def test_streaming_does_not_change_torch_threads(hub_env):
    before = torch.get_num_threads()
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert torch.get_num_threads() == before


def test_a_tap_reused_for_another_download_starts_afresh(server, tiny_folder, tmp_path):
    """A tap that saw other bytes (an earlier mirror, another partial) of the very length the next download resumes
    from must read that download's partial back, not carry on from what it saw."""
    folder = tiny_folder[0]
    tap = _tap(folder, tmp_path / "converted")
    seen = tap.pieces[0].offset + tap.pieces[0].size // 2  # inside the first variable: no check has run yet
    tap.update(b"\0" * seen)  # what an earlier download showed it
    dest = tmp_path / "raw" / DATA
    dest.parent.mkdir()
    (dest.parent / f"{DATA}.99999.incomplete").write_bytes((folder / DATA).read_bytes()[:seen])
    gpt2hub.download.download(f"{server.url}/{TINY.size}/{DATA}", dest, tap=tap)
    made = tap.result(dest)
    assert made is not None
    _assert_same(load_safetensors(made[0]), _reference(folder, torch.bfloat16))
    tap.close()


def test_heavy_taps_run_beside_the_download_and_light_ones_inline(server, tmp_path):
    """sha256 and converting get a thread of their own; crc32c alone runs in the downloading thread, where handing
    each chunk over would cost more than the work."""
    seen: dict[str, set[str]] = {}

    class Probe:
        def __init__(self, heavy: bool) -> None:
            self.heavy, self.length = heavy, 0

        def catch_up(self, part, offset):
            self.length = offset

        def update(self, chunk):
            seen.setdefault("heavy" if self.heavy else "light", set()).add(threading.current_thread().name)

    url = f"{server.url}/{TINY.size}/{DATA}"
    for heavy in (True, False):
        gpt2hub.download.download(url, tmp_path / f"{heavy}" / DATA, tap=Probe(heavy))
    assert seen["light"] == {threading.current_thread().name}
    assert len(seen["heavy"]) == 1 and next(iter(seen["heavy"])).startswith("gpt2hub-tap-")
