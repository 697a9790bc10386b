import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from server import COMMIT, Fault

import gpt2hub
from gpt2hub import (
    CacheError,
    DownloadError,
    IntegrityError,
    LockTimeoutError,
    OfflineError,
    UnknownModelError,
    download_and_load_gpt2,
    from_pretrained,
    load_tokenizer,
)
from gpt2hub.cache import Cache, EntryKey
from gpt2hub.files import crc32c_file
from gpt2hub.inventory import model_entry
from gpt2hub.registry import OPENAI_FILES

DATA = "model.ckpt.data-00000-of-00001"
WORKER = str(Path(__file__).parent / "worker.py")


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None])


def _weights_file(cache: Path, source: str) -> Path:
    """The published weights file that float32 maps (in Hugging Face's cache for source="hf")."""
    m = model_entry(cache, "tiny", source, COMMIT if source == "hf" else None)
    return m.file_path(m.manifest("float32").weights).resolve()


def _gets(server, name: str) -> list:
    return server.served.requests("GET", f"/{TINY.size}/{name}")


def test_from_pretrained_downloads_converts_and_matches_the_folder(hub_env, server, tiny_folder):
    model = from_pretrained("gpt2-tiny")
    assert not model.training and model.tied
    assert torch.allclose(_logits(model), _logits(from_pretrained(tiny_folder[0])), atol=1e-6)
    for name in OPENAI_FILES:
        assert len(_gets(server, name)) == 1, name
        assert (hub_env / "openai" / "tiny" / "raw" / name).read_bytes() == (tiny_folder[0] / name).read_bytes()
    files = json.loads((hub_env / "openai" / "tiny" / "files.json").read_text())
    assert files["encoder.json"]["sha256"] == gpt2hub.registry.TOKENIZER_SHA256["encoder.json"]
    assert "sha256" not in files[DATA] and files[DATA]["crc32c"] == crc32c_file(tiny_folder[0] / DATA)  # none pinned
    manifest = json.loads((hub_env / "openai" / "tiny" / "converted" / "float32.json").read_text())
    assert manifest["format"] == 2 and manifest["source"] == "openai" and manifest["kind"] == "mapped"
    assert manifest["weights"] == DATA and manifest["bytes"] == (tiny_folder[0] / DATA).stat().st_size
    assert not list(hub_env.rglob("*.incomplete")) and not list(hub_env.rglob("*.tmp"))


def test_warm_cache_makes_no_request_and_survives_a_dead_server(hub_env, server):
    first = _logits(from_pretrained("gpt2-tiny"))
    before = len(server.served.log)
    server.close()
    again = from_pretrained("gpt2-tiny")
    assert len(server.served.log) == before
    assert torch.equal(_logits(again), first)
    load_tokenizer("gpt2-tiny")
    assert len(server.served.log) == before


def test_dtypes_are_converted_once_each(hub_env, server):
    for dtype in ("bfloat16", torch.float16, "float32"):
        model = from_pretrained("gpt2-tiny", dtype=dtype)
        assert model.tok_emb.weight.dtype == gpt2hub.storage.TORCH_DTYPES[str(dtype).removeprefix("torch.")]
    converted = hub_env / "openai/tiny/converted"
    assert sorted(p.name for p in converted.glob("*")) == ["bfloat16.json", "bfloat16.safetensors", "float16.json",
                                                           "float16.safetensors", "float32.json"]
    assert len(_gets(server, DATA)) == 1


@pytest.mark.parametrize("source", ["openai", "hf"])
def test_float32_maps_the_published_weights_file(hub_env, server, request, source):
    if source == "hf":
        request.getfixturevalue("hf_cache")
    model = from_pretrained("gpt2-tiny", source=source)
    entry = hub_env / source / "tiny" / (COMMIT if source == "hf" else "")
    manifest = json.loads((entry / "converted/float32.json").read_text())
    weights = _weights_file(hub_env, source)
    assert manifest["weights"] == weights.name or source == "hf"  # Hugging Face's blobs are named by their hash
    assert manifest["bytes"] == weights.stat().st_size and not list((hub_env / source).rglob("*.safetensors"))
    before = weights.read_bytes()
    # every weight is a view of the file's bytes: c_attn is one matrix, W_query/W_key/W_value its column blocks
    att = model.trf_blocks[0].att
    assert att.fused_qkv() is not None and att.W_key.weight.data_ptr() == att.W_query.weight.data_ptr() + 4 * 32
    maps = [line.split() for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(weights))]
    spans = [[int(a, 16) for a in m[0].split("-")] for m in maps]
    assert spans
    for name, p in model.named_parameters():  # each one's memory lies in the mapping of the cached file
        assert any(lo <= p.data_ptr() < hi for lo, hi in spans), name
    p = model.trf_blocks[1].ff.layers[0].weight
    with torch.no_grad():
        p.mul_(0)  # mapped copy-on-write: writing to the model never reaches the cache
    assert weights.read_bytes() == before


@pytest.mark.parametrize("var", ["GPT2HUB_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_cold_fails_at_once_naming_files_and_folder(hub_env, server, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(OfflineError) as e:
        from_pretrained("gpt2-tiny")
    assert DATA in str(e.value) and str(hub_env / "openai" / "tiny") in str(e.value)
    assert server.served.log == []
    assert not (hub_env / "locks").exists()  # at once: it neither waited for a lock nor tried the network
    with pytest.raises(OfflineError, match="encoder.json"):
        load_tokenizer("gpt2-tiny")


def test_offline_warm_works(hub_env, server, monkeypatch):
    from_pretrained("gpt2-tiny")
    n = len(server.served.log)
    monkeypatch.setenv("GPT2HUB_OFFLINE", "1")
    from_pretrained("gpt2-tiny")
    load_tokenizer("gpt2-tiny")
    assert len(server.served.log) == n
    # another dtype is converted from the cached raw files, still without a request
    assert from_pretrained("gpt2-tiny", dtype="bfloat16").tok_emb.weight.dtype == torch.bfloat16
    assert len(server.served.log) == n


def test_dropped_connection_resumes_with_range(hub_env, server):
    server.served.fault(f"/tiny/{DATA}", Fault("drop", after=1_000_000))
    server.served.fault(f"/tiny/{DATA}", Fault("drop", after=2_000_000))
    from_pretrained("gpt2-tiny")
    ranges = [r for _, _, r in _gets(server, DATA)]
    assert ranges == [None, "bytes=1000000-", "bytes=3000000-"]
    record = json.loads((hub_env / "openai/tiny/files.json").read_text())[DATA]
    assert record["crc32c"] == crc32c_file(hub_env / "openai/tiny/raw" / DATA)  # hashed across the three pieces


def test_server_that_ignores_range_restarts_cleanly(hub_env, server, tiny_folder):
    server.served.fault(f"/tiny/{DATA}", Fault("drop", after=500_000))
    server.served.fault(f"/tiny/{DATA}", Fault("ignore_range"))
    from_pretrained("gpt2-tiny")
    assert (hub_env / "openai/tiny/raw" / DATA).read_bytes() == (tiny_folder[0] / DATA).read_bytes()


def test_5xx_then_success(hub_env, server):
    server.served.fault("/tiny/hparams.json", Fault("status", status=503, times=2))
    server.served.fault("/tiny/vocab.bpe", Fault("status", status=500))
    from_pretrained("gpt2-tiny")
    assert len(_gets(server, "hparams.json")) == 3 and len(_gets(server, "vocab.bpe")) == 2


def test_404_fails_at_once_naming_the_url(hub_env, server):
    del server.served.files["/tiny/model.ckpt.meta"]
    with pytest.raises(DownloadError, match=rf"404.*{server.url}/tiny/model.ckpt.meta"):
        from_pretrained("gpt2-tiny")
    assert len(_gets(server, "model.ckpt.meta")) == 1


def test_persistent_5xx_gives_up_keeping_partial_bytes(hub_env, server, monkeypatch):
    monkeypatch.setattr(gpt2hub.transports, "download", _fast_backoff(gpt2hub.download.download))
    server.served.fault(f"/tiny/{DATA}", Fault("drop", after=700_000))
    server.served.fault(f"/tiny/{DATA}", Fault("status", status=502, times=4))  # every retry of this call
    with pytest.raises(DownloadError, match="resume"):
        from_pretrained("gpt2-tiny")
    [part] = (hub_env / "openai/tiny/raw").glob(f"{DATA}.*.incomplete")
    assert part.stat().st_size == 700_000
    from_pretrained("gpt2-tiny")  # a later call claims the partial file and resumes from byte 700000
    assert _gets(server, DATA)[-1][2] == "bytes=700000-"


def _fast_backoff(fn):
    def wrapped(*args, **kwargs):
        return fn(*args, **{**kwargs, "backoff": 0.01})
    return wrapped


def test_corrupted_pinned_file_is_an_error_and_is_gone(hub_env, server):
    server.served.fault("/tiny/encoder.json", Fault("corrupt", times=2))  # fetched once more, bad again
    with pytest.raises(IntegrityError, match="encoder.json.*sha256"):
        from_pretrained("gpt2-tiny")
    raw = hub_env / "openai/tiny/raw"
    assert not (raw / "encoder.json").exists() and not list(raw.glob("encoder.json*"))
    from_pretrained("gpt2-tiny")  # the next call fetches it afresh


def test_corrupted_checkpoint_bytes_caught_by_crc_and_fetched_again_once(hub_env, server, caplog):
    server.served.fault(f"/tiny/{DATA}", Fault("corrupt"))  # same size, one flipped byte: only crc32c can tell
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        model = from_pretrained("gpt2-tiny")  # the bad data file is fetched again in the same call
    assert re.search(rf"{DATA}.*model/h0/attn/c_attn/b.*crc32c", caplog.text)
    assert len(_gets(server, DATA)) == 2 and len(_gets(server, "model.ckpt.index")) == 1
    assert model.tok_emb.weight.shape[0] == TINY.vocab_size


def test_a_file_damaged_again_after_one_refetch_is_a_final_error_naming_it_and_its_mirror(hub_env, server):
    server.served.fault(f"/tiny/{DATA}", Fault("corrupt", times=5))
    with pytest.raises(IntegrityError, match=rf"{DATA} of gpt2-tiny.*{server.url}/tiny/{DATA}.*crc32c"):
        from_pretrained("gpt2-tiny")
    assert len(_gets(server, DATA)) == 2  # once, then once more: never forever
    assert not (hub_env / "openai/tiny/raw" / DATA).exists()
    assert DATA not in json.loads((hub_env / "openai/tiny/files.json").read_text())


def test_damaged_converted_file_is_rebuilt_without_network(hub_env, server, caplog):
    first = _logits(from_pretrained("gpt2-tiny", dtype="bfloat16"))
    conv = hub_env / "openai/tiny/converted/bfloat16.safetensors"
    data = bytearray(conv.read_bytes())
    data[len(data) // 2] ^= 0xFF
    conv.write_bytes(bytes(data))
    n = len(server.served.log)
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        assert torch.equal(_logits(from_pretrained("gpt2-tiny", dtype="bfloat16")), first)
    assert "damaged" in caplog.text and len(server.served.log) == n
    conv.write_bytes(conv.read_bytes()[:1000])  # truncated
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", dtype="bfloat16")), first)


@pytest.mark.parametrize("source", ["openai", "hf"])
def test_damaged_mapped_weights_are_caught_and_fetched_again(hub_env, server, request, caplog, source):
    if source == "hf":
        request.getfixturevalue("hf_cache")
    first = _logits(from_pretrained("gpt2-tiny", source=source))
    weights = _weights_file(hub_env, source)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size; the timestamp moves, so the next load checks it in full
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        assert torch.equal(_logits(from_pretrained("gpt2-tiny", source=source)), first)
    assert "damaged" in caplog.text
    gets = server.served.requests("GET", DATA if source == "openai" else "model.safetensors")
    assert len(gets) == 2  # deleted and downloaded again, in the same call


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_copied_elsewhere_are_verified_once(hub_env, server, caplog, monkeypatch, dtype):
    from_pretrained("gpt2-tiny", dtype=dtype)
    weights = hub_env / "openai/tiny" / ("raw/" + DATA if dtype == "float32" else f"converted/{dtype}.safetensors")
    os.utime(weights, ns=(1, 1_000_000_000))  # a copy with a new timestamp, same bytes
    hashed = []
    real = gpt2hub.files.DIGESTS["crc32c"]
    monkeypatch.setitem(gpt2hub.files.DIGESTS, "crc32c", lambda p: hashed.append(Path(p).name) or real(p))
    monkeypatch.setattr(gpt2hub.checks, "crc32c_file", gpt2hub.files.DIGESTS["crc32c"])
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        from_pretrained("gpt2-tiny", dtype=dtype)
        from_pretrained("gpt2-tiny", dtype=dtype)
    assert hashed == [weights.name] and "differs" not in caplog.text  # checked in full once, then trusted


def test_mirror_fallback(hub_env, server, monkeypatch):
    import socket

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()  # nothing listens there: connection refused
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", f"http://127.0.0.1:{port}, {server.url}")
    from_pretrained("gpt2-tiny")
    assert len(_gets(server, DATA)) == 1


def test_killed_mid_download_resumes_in_a_later_call(hub_env, server):
    server.served.fault(f"/tiny/{DATA}", Fault("slow", delay=0.05))
    proc = subprocess.Popen([sys.executable, WORKER, "download"], env=os.environ.copy())
    part = hub_env / "openai/tiny/raw" / f"{DATA}.{proc.pid}.incomplete"
    deadline = time.monotonic() + 60
    while not (part.exists() and part.stat().st_size > 500_000):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    got = part.stat().st_size
    assert not (hub_env / "openai/tiny/raw" / DATA).exists()  # never a truncated file under the final name
    from_pretrained("gpt2-tiny")
    last = _gets(server, DATA)[-1][2]
    assert last is not None and int(last.split("=")[1].rstrip("-")) >= got - (1 << 20)
    record = json.loads((hub_env / "openai/tiny/files.json").read_text())[DATA]
    assert record["crc32c"] == crc32c_file(hub_env / "openai/tiny/raw" / DATA)  # the kept bytes re-read and hashed


def test_many_processes_on_an_empty_cache_download_once(hub_env, server):
    server.served.fault(f"/tiny/{DATA}", Fault("slow", delay=0.01))
    procs = [subprocess.Popen([sys.executable, WORKER], env=os.environ.copy(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1
    for name in OPENAI_FILES:
        assert len(_gets(server, name)) == 1, name
    assert any("waiting for" in o[1] for o in outs)  # the others said why they waited


def test_lock_held_elsewhere_times_out_with_a_clear_error(hub_env, server, monkeypatch, caplog):
    lock_path = Cache(hub_env).lock_path(EntryKey("openai", "tiny"))
    lock_path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", f"import filelock,time\nl=filelock.FileLock({str(lock_path)!r})\n"
                               "l.acquire(); print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("GPT2HUB_LOCK_TIMEOUT", "1")
        with caplog.at_level(logging.WARNING, logger="gpt2hub"), pytest.raises(LockTimeoutError, match="openai--tiny.lock"):
            from_pretrained("gpt2-tiny")
        assert "waiting for" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    from_pretrained("gpt2-tiny")  # the holder died: its lock is gone with it, no stale lock blocks


def test_bad_names_sources_dtypes_and_unwritable_cache(hub_env, server, monkeypatch, tmp_path):
    with pytest.raises(UnknownModelError, match="gpt2-small"):
        from_pretrained("gpt2-smal")
    with pytest.raises(UnknownModelError):
        from_pretrained("../../etc")
    with pytest.raises(ValueError, match="source"):
        from_pretrained("gpt2-tiny", source="s3")
    with pytest.raises(ValueError, match="dtype"):
        from_pretrained("gpt2-tiny", dtype="int3")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GPT2HUB_CACHE", str(blocker / "cache"))
    with pytest.raises(CacheError, match="a-file"):
        from_pretrained("gpt2-tiny")
    assert server.served.log == []


def test_disk_full_is_a_clear_error_and_leaves_no_final_file(hub_env, server):
    raw = hub_env / "openai/tiny/raw"
    raw.mkdir(parents=True)
    # a disk with room for the partial file's first 64 KiB of encoder.json's 1 MB (a link planted at the partial's
    # name is removed, never written through, so a full disk is made for real)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(raw)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[:100]}")
    try:
        with pytest.raises(CacheError, match="no space left.*GPT2HUB_CACHE"):
            load_tokenizer("gpt2-tiny")
        assert not (raw / "encoder.json").exists()
    finally:
        subprocess.run(["umount", str(raw)], check=True)


def test_tokenizer_downloads_only_the_vocabulary(hub_env, server):
    enc = load_tokenizer("gpt2-tiny")
    assert enc.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert sorted(p for _, p, _ in server.served.requests("GET")) == ["/tiny/encoder.json", "/tiny/vocab.bpe"]


def test_hf_source_matches_openai_and_reuses_the_hf_cache(hub_env, server, hf_cache):
    hf = from_pretrained("gpt2-tiny", source="hf")
    assert torch.allclose(_logits(hf), _logits(from_pretrained("gpt2-tiny")), atol=1e-6)
    assert load_tokenizer("gpt2-tiny", source="hf").encode("Every effort moves you") == [6109, 3626, 6100, 345]
    n = len(server.served.log)
    from_pretrained("gpt2-tiny", source="hf")
    load_tokenizer("gpt2-tiny", source="hf")
    assert len(server.served.log) == n
    # a user who already has the files in the Hugging Face cache downloads nothing more
    import shutil

    shutil.rmtree(hub_env / "hf")
    n = len(server.served.log)
    from_pretrained("gpt2-tiny", source="hf", local_files_only=True)
    assert len(server.served.log) == n


def test_hf_file_failing_its_pinned_sha256_goes_with_its_blob(hub_env, server, hf_cache, hf_folder, monkeypatch):
    import hashlib

    good = hashlib.sha256((hf_folder / "model.safetensors").read_bytes()).hexdigest()
    monkeypatch.setitem(TINY.sha256, "hf", {"model.safetensors": good})
    server.served.fault(f"/hf/{TINY.hf_repo}/model.safetensors", Fault("corrupt"))
    with pytest.raises(IntegrityError, match="model.safetensors.*sha256"):
        from_pretrained("gpt2-tiny", source="hf")
    # the bad blob is gone too, so Hugging Face's cache cannot hand it back: the next call downloads it afresh
    model = from_pretrained("gpt2-tiny", source="hf")
    assert len(server.served.requests("GET", "model.safetensors")) == 2
    assert torch.allclose(_logits(model), _logits(from_pretrained("gpt2-tiny")), atol=1e-6)


def test_hf_weights_are_hashed_once_cold_and_checked_before_a_later_first_float32_load(hub_env, server, hf_cache,
                                                                                        monkeypatch, caplog):
    hashed = []
    real = gpt2hub.files.DIGESTS["crc32c"]
    monkeypatch.setitem(gpt2hub.files.DIGESTS, "crc32c", lambda p: hashed.append(Path(p).name) or real(p))
    first = _logits(from_pretrained("gpt2-tiny", source="hf"))
    assert hashed.count("model.safetensors") == 1  # on arrival; the float32 mapping trusts that fresh digest
    # damaged after download, before float32 first maps it: refused, removed, fetched afresh on the next call
    hub_env.joinpath(f"hf/tiny/{COMMIT}/converted/float32.json").unlink()
    weights = Path(json.loads((hub_env / f"hf/tiny/{COMMIT}/files.json").read_text())["model.safetensors"]["path"]).resolve()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):  # noticed, removed with its blob, fetched afresh
        assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf")), first)
    assert "differs" in caplog.text
    assert len(server.served.requests("GET", "model.safetensors")) == 2


def test_book_api_fills_models_dir_through_the_cache(hub_env, server, tmp_path, tiny_folder):
    models_dir = tmp_path / "gpt2"
    settings, params = download_and_load_gpt2(model_size="tiny", models_dir=str(models_dir))
    assert settings == TINY.hparams()
    assert set(params) == {"blocks", "b", "g", "wpe", "wte"} and len(params["blocks"]) == 2
    assert sorted(p.name for p in (models_dir / "tiny").iterdir()) == sorted(OPENAI_FILES)
    # copies, not links: editing the notebook's files cannot reach the cache
    assert (models_dir / "tiny" / DATA).stat().st_ino != (hub_env / "openai/tiny/raw" / DATA).stat().st_ino
    n = len(server.served.log)
    download_and_load_gpt2("tiny", str(tmp_path / "elsewhere"))
    assert len(server.served.log) == n  # a second project reuses the cache
    model = gpt2hub.GPTModel(gpt2hub.convert.config_from_hparams(settings))
    gpt2hub.load_weights_into_gpt(model, params)
    assert torch.allclose(_logits(model.eval()), _logits(from_pretrained(tiny_folder[0])), atol=1e-6)


def test_force_download_fetches_again_and_replaces_atomically(hub_env, server):
    first = _logits(from_pretrained("gpt2-tiny"))
    again = from_pretrained("gpt2-tiny", force_download=True)
    for name in OPENAI_FILES:
        assert len(_gets(server, name)) == 2, name
    assert torch.equal(_logits(again), first)


def test_book_download_adopts_files_already_in_models_dir_instead_of_downloading(hub_env, server, tmp_path, tiny_folder):
    import shutil

    models_dir = tmp_path / "gpt2"
    shutil.copytree(tiny_folder[0], models_dir / "tiny")  # the book's own download, made before gpt2hub
    (models_dir / "tiny" / "vocab.bpe").write_bytes(b"<html>not the vocabulary</html>")  # one bad file
    settings, params = download_and_load_gpt2("tiny", str(models_dir))
    fetched = sorted(p for _, p, _ in server.served.requests("GET"))
    assert fetched == ["/tiny/vocab.bpe"]  # every good file adopted, the bad one downloaded (and replaced)
    files = json.loads((hub_env / "openai/tiny/files.json").read_text())
    assert files[DATA]["url"].startswith("file://") and files["vocab.bpe"]["url"].startswith(server.url)
    for name in OPENAI_FILES:
        assert (models_dir / "tiny" / name).read_bytes() == (tiny_folder[0] / name).read_bytes()
        assert (hub_env / "openai/tiny/raw" / name).read_bytes() == (tiny_folder[0] / name).read_bytes()
    assert settings == TINY.hparams() and len(params["blocks"]) == 2
