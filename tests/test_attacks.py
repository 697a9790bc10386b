"""Attacks on the load path: a hostile network, and a careless or malicious user with write access to a shared cache.

Each test asserts the safe behaviour: files outside the cache are untouched, and the outcome is either a repair
(the right model) or a one-line typed error naming the file. Eleven of these attacks broke the first rebuilt load
path (files deleted outside the cache through linked folders, an endless body filling the disk, a lying 416); they
were fixed and stay here as regression tests.
"""

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import TINY
from server import COMMIT

from gpt2hub import from_pretrained
from gpt2hub.checks import verify
from gpt2hub.cli import main
from gpt2hub.errors import GPT2HubError
from gpt2hub.files import regular_file
from gpt2hub.inventory import model_entry
from gpt2hub.registry import OPENAI_FILES

DATA, INDEX = "model.ckpt.data-00000-of-00001", "model.ckpt.index"
VICTIM = b"the user's own file, outside the cache\n" * 10
WORKER = str(Path(__file__).parent / "worker.py")
HTML = b"<!DOCTYPE html><html><body>Service temporarily unavailable</body></html>\n"


# helpers ------------------------------------------------------------------------------------------------------------
def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None])


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """The tiny model's logits, read straight from its folder."""
    return _logits(from_pretrained(tiny_folder[0]))


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def _plant(folder: Path, *names: str) -> list[Path]:
    """Victim files (the user's own, outside the cache) at `folder/name`."""
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(VICTIM)
        paths.append(path)
    return paths


def _intact(paths: list[Path]) -> bool:
    return all(p.is_file() and not p.is_symlink() and p.read_bytes() == VICTIM for p in paths)


def _bounded(fn, seconds: float = 30.0) -> dict:
    """Run `fn` in a thread; fail if it is still running after `seconds` (a hang). Returns {"value"} or {"error"}."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - judged by the caller
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still running after {seconds:.0f} s: it hangs")
    return out


def _typed(e: BaseException, *words: str) -> None:
    """A gpt2hub error (never KeyError, TypeError, a bare OSError...) in one line, naming each of `words`."""
    assert isinstance(e, GPT2HubError), f"{type(e).__name__} escaped: {e}"
    assert "\n" not in str(e) and all(w in str(e) for w in words), str(e)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _swap_for_link(path: Path, target: Path) -> None:
    """Replace the file or folder at `path` with a symbolic link to `target`."""
    if path.is_dir() and not path.is_symlink():
        for p in sorted(path.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        path.rmdir()
    elif os.path.lexists(path):
        path.unlink()
    path.symlink_to(target)


# symbolic links in every position of the cache ------------------------------------------------------------------------
def test_raw_folder_linked_outside_leaves_the_outside_alone(hub_env, server, outside, reference):
    from_pretrained("gpt2-tiny")
    victims = _plant(outside, "hparams.json", "vocab.bpe", DATA)
    _swap_for_link(hub_env / "openai/tiny/raw", outside)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert _intact(victims) and sorted(p.name for p in outside.iterdir()) == sorted(p.name for p in victims)
    assert "error" in out and _typed(out["error"], "raw") is None or torch.equal(out["value"], reference)


def test_prune_does_not_follow_a_linked_raw_folder(hub_env, server, outside, capsys):
    from_pretrained("gpt2-tiny")
    victims = _plant(outside, "notes.incomplete", "draft.tmp")
    _swap_for_link(hub_env / "openai/tiny/raw", outside)
    assert _cli(capsys, "cache", "prune")[0] == 0
    assert _intact(victims)


def test_converted_folder_linked_outside_leaves_the_outside_alone(hub_env, server, outside, reference):
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    victims = _plant(outside, "float32.safetensors", "bfloat16.json", "bfloat16.safetensors")
    _swap_for_link(hub_env / "openai/tiny/converted", outside)
    for dtype in ("float32", "bfloat16"):
        out = _bounded(lambda d=dtype: from_pretrained("gpt2-tiny", dtype=d))
        if "error" in out:
            _typed(out["error"], "converted")
    assert _intact(victims) and len(list(outside.iterdir())) == len(victims)


def test_model_folder_linked_outside_deletes_nothing_there(hub_env, server, outside, reference):
    victims = _plant(outside, "raw/hparams.json", "raw/vocab.bpe", "converted/float32.safetensors")
    (hub_env / "openai").mkdir(parents=True)
    (hub_env / "openai/tiny").symlink_to(outside)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert _intact(victims)
    assert "error" in out and _typed(out["error"], "tiny") is None or torch.equal(out["value"], reference)


def test_rm_does_not_follow_a_linked_source_folder(hub_env, server, outside, capsys):
    victims = _plant(outside, "tiny/raw/hparams.json", "tiny/notes.txt")
    hub_env.mkdir(parents=True)
    (hub_env / "openai").symlink_to(outside)
    code, _, err = _cli(capsys, "cache", "rm", "gpt2-tiny")
    assert _intact(victims) and "Traceback" not in err and code in (0, 1)


def test_a_linked_files_json_is_replaced_not_written_through(hub_env, server, victim_file, reference):
    from_pretrained("gpt2-tiny")
    files_json = hub_env / "openai/tiny/files.json"
    _swap_for_link(files_json, victim_file)
    (hub_env / "openai/tiny/raw" / "vocab.bpe").unlink()  # something to record
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)
    assert _intact([victim_file]) and not files_json.is_symlink()
    assert set(json.loads(files_json.read_text())) == set(OPENAI_FILES)


@pytest.fixture
def victim_file(outside):
    return _plant(outside, "precious.bin")[0]


def test_a_linked_lock_owner_file_is_not_written_through(hub_env, server, victim_file):
    (hub_env / "locks").mkdir(parents=True)
    (hub_env / "locks/openai--tiny.owner").symlink_to(victim_file)
    from_pretrained("gpt2-tiny")
    assert _intact([victim_file])


def test_a_linked_lock_file_does_not_truncate_its_target(hub_env, server, victim_file):
    (hub_env / "locks").mkdir(parents=True)
    (hub_env / "locks/openai--tiny.lock").symlink_to(victim_file)
    out = _bounded(lambda: from_pretrained("gpt2-tiny"))
    if "error" in out:
        _typed(out["error"], "openai--tiny.lock")
    assert _intact([victim_file])


def test_a_linked_locks_folder_writes_nothing_outside(hub_env, server, outside):
    victims = _plant(outside, "openai--tiny.owner", "openai--tiny.lock")
    hub_env.mkdir(parents=True)
    (hub_env / "locks").symlink_to(outside)
    out = _bounded(lambda: from_pretrained("gpt2-tiny"))
    if "error" in out:
        _typed(out["error"], "locks")
    assert _intact(victims)


def test_a_folder_where_the_lock_file_belongs_is_a_typed_error_not_a_hang(hub_env, server, monkeypatch):
    monkeypatch.setenv("GPT2HUB_LOCK_TIMEOUT", "1")
    (hub_env / "locks/openai--tiny.lock").mkdir(parents=True)
    out = _bounded(lambda: from_pretrained("gpt2-tiny"))
    assert "error" in out
    _typed(out["error"], "openai--tiny.lock")


def test_a_file_where_the_model_folder_belongs_is_replaced_with_a_warning(hub_env, server, reference, caplog):
    (hub_env / "openai").mkdir(parents=True)
    (hub_env / "openai/tiny").write_bytes(b"not a folder")
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)
    assert "openai/tiny is a file where gpt2hub keeps a folder" in caplog.text and (hub_env / "openai/tiny").is_dir()


# records and manifests of the wrong shape -----------------------------------------------------------------------------
@pytest.mark.parametrize("record", [{"size": -1, "crc32c": "00000000"}, {"size": 10, "crc32c": "ABCDEF01"},
                                    {"size": 10, "sha256": None, "crc32c": "00000000"}, {"size": 1e3, "crc32c": "0"},
                                    {"size": 10, "crc32c": "00000000", "path": 5}, {"size": 10, "crc32c": "00000000",
                                                                                     "mtime_ns": "now", "url": []}])
def test_records_of_wrong_types_are_rebuilt_and_verify_reports_them(hub_env, server, capsys, record, reference):
    from_pretrained("gpt2-tiny")
    m = hub_env / "openai/tiny"
    files = json.loads((m / "files.json").read_text())
    (m / "files.json").write_text(json.dumps({**files, DATA: record, "": record, "hparams.json": [record]}))
    code, out, err = _cli(capsys, "cache", "verify")
    assert code == 1 and DATA in out and "Traceback" not in err
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)
    assert _cli(capsys, "cache", "verify")[0] == 0 and _cli(capsys, "cache", "list")[0] == 0


@pytest.mark.parametrize("config", [{}, {"n_layers": "two"}, "fewer layers"])
def test_a_manifest_config_that_lies_is_refused_or_repaired(hub_env, server, config, reference):
    from_pretrained("gpt2-tiny")
    path = hub_env / "openai/tiny/converted/float32.json"
    manifest = json.loads(path.read_text())
    if config == "fewer layers":
        config = {**manifest["config"], "n_layers": 1}
    path.write_text(json.dumps({**manifest, "config": config}))
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert "error" in out and _typed(out["error"], "float32.json") is None or torch.equal(out["value"], reference)


def test_a_bfloat16_manifest_claiming_mapped_is_not_believed(hub_env, server):
    from_pretrained("gpt2-tiny")
    conv = hub_env / "openai/tiny/converted"
    (conv / "bfloat16.json").write_text(json.dumps({**json.loads((conv / "float32.json").read_text()),
                                                     "dtype": "bfloat16"}))
    model = from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert model.tok_emb.weight.dtype == torch.bfloat16


def test_a_converted_manifest_naming_another_file_is_ignored(hub_env, server, reference):
    first = _logits(from_pretrained("gpt2-tiny", dtype="bfloat16"))
    path = hub_env / "openai/tiny/converted/bfloat16.json"
    for weights in (DATA, "float16.safetensors", "../raw/" + DATA, 7):
        path.write_text(json.dumps({**json.loads(path.read_text()), "weights": weights}))
        assert torch.equal(_logits(from_pretrained("gpt2-tiny", dtype="bfloat16")), first)


# Hugging Face records ------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    root = tmp_path / "hf_home" / "hub"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    return root


def test_hf_records_pointing_outside_the_hf_cache_are_ignored(hub_env, server, hf_hub, victim_file, tmp_path):
    first = _logits(from_pretrained("gpt2-tiny", source="hf"))
    files_json = hub_env / f"hf/tiny/{COMMIT}/files.json"
    files = json.loads(files_json.read_text())
    for name, path in (("config.json", str(victim_file)), ("vocab.json", f"{hf_hub}/../../outside/precious.bin")):
        files[name] = {"size": len(VICTIM), "crc32c": "00000000", "path": path}
    files_json.write_text(json.dumps(files))
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf")), first)
    assert _intact([victim_file])


def test_a_linked_snapshot_folder_in_the_hf_cache_deletes_nothing_outside(hub_env, server, hf_hub, outside):
    from_pretrained("gpt2-tiny", source="hf")
    snapshot = next((hf_hub / f"models--{TINY.hf_repo.replace('/', '--')}" / "snapshots").iterdir())
    victims = _plant(outside, "config.json", "vocab.json")
    _swap_for_link(snapshot, outside)
    out = _bounded(lambda: from_pretrained("gpt2-tiny", source="hf"))
    assert _intact(victims)
    if "error" in out:
        _typed(out["error"])


def test_an_hf_record_cannot_delete_another_repos_blob(hub_env, server, hf_hub):
    from_pretrained("gpt2-tiny", source="hf")
    other = _plant(hf_hub / "models--someone--else" / "blobs", "f" * 64)
    files_json = hub_env / f"hf/tiny/{COMMIT}/files.json"
    files = json.loads(files_json.read_text())
    files["config.json"] = {**files["config.json"], "path": str(other[0])}
    files_json.write_text(json.dumps(files))
    from_pretrained("gpt2-tiny", source="hf")
    assert _intact(other)


# a hostile network ---------------------------------------------------------------------------------------------------
class Hostile:
    """A mirror whose answer for one file is written by `behave(handler, data, range_start)`; others are honest."""

    def __init__(self, files: dict[str, bytes], target: str, behave):
        self.sent: list[int] = []  # bytes of the body sent, per request for the target
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                data = files.get(self.path.removeprefix("/h"))
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].rstrip("-")) if rng else None
                if data is None:
                    return _send(self, 404, b"")
                if self.path.endswith("/" + target):
                    return behave(self, data, start, outer)
                return _send(self, 206 if start else 200, data[start or 0:], start, len(data))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/h"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(h, status: int, body: bytes, start: int | None = None, total: int | None = None, length: int | None = None,
          headers: dict | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    if status == 206:
        h.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    try:
        h.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    if length is not None and length != len(body):
        h.close_connection = True


def _endless(h, data, start, srv):
    """200 with no Content-Length, then bytes until the client hangs up (capped, so a failing test ends)."""
    h.send_response(200)
    h.send_header("Connection", "close")
    h.end_headers()
    h.close_connection = True
    srv.sent.append(0)
    chunk = (b"0" * 65535) + b"\n"
    try:
        while srv.sent[-1] < 48 << 20:
            h.wfile.write(chunk)
            srv.sent[-1] += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _length_short(h, data, start, srv):
    _send(h, 200, data[: len(data) - 10], length=len(data) - 10)


def _length_long(h, data, start, srv):
    if start:  # the honest answer to the resume: nothing more
        return _send(h, 416, b"", headers={"Content-Range": f"bytes */{len(data)}"})
    _send(h, 200, data, length=len(data) + 100)


def _cut(h, data) -> None:
    """Half the body under the whole file's Content-Length, then the connection closes."""
    _send(h, 200, data[: len(data) // 2], length=len(data))


def _drop_then_200(h, data, start, srv):
    if start is None and not srv.sent:
        srv.sent.append(1)
        return _cut(h, data)
    _send(h, 200, data)  # ignores the Range header


def _drop_then_bogus_206(h, data, start, srv):
    if start is None:
        return _cut(h, data)
    _send(h, 206, data[start:], 0, len(data))  # says it starts at byte 0


def _drop_then_lying_416(h, data, start, srv):
    if start is None and not srv.sent:
        srv.sent.append(1)
        return _cut(h, data)
    if start:
        return _send(h, 416, b"", headers={"Content-Range": f"bytes */{start}"})  # "you have it all"
    _send(h, 200, data)


def _bogus_416(h, data, start, srv):
    if start is None:
        return _cut(h, data)
    _send(h, 416, b"", headers={"Content-Range": "bytes */banana"})


def _gzip(h, data, start, srv):
    _send(h, 200, gzip.compress(data), headers={"Content-Encoding": "gzip"})


def _html(h, data, start, srv):
    _send(h, 200, HTML, headers={"Content-Type": "text/html"})


@pytest.fixture
def hostile(server, hub_env, monkeypatch):
    """Start a hostile mirror for one file: `hostile(file, behave, alone)`; alone=False puts an honest one after it."""
    started = []

    def start(target: str, behave, alone: bool = True) -> Hostile:
        srv = Hostile(server.served.files, target, behave)
        started.append(srv)
        monkeypatch.setenv("GPT2HUB_OPENAI_URL", srv.url if alone else f"{srv.url} {server.url}")
        monkeypatch.setattr("gpt2hub.download.time.sleep", lambda s: None)
        return srv

    yield start
    for srv in started:
        srv.close()


@pytest.mark.parametrize("name", ["hparams.json", DATA])
def test_an_endless_body_is_cut_off(hostile, name):
    srv = hostile(name, _endless)
    out = _bounded(lambda: from_pretrained("gpt2-tiny"), 60)
    assert "error" in out
    _typed(out["error"], name)
    assert max(srv.sent) < 16 << 20, f"read {max(srv.sent)} bytes of an endless {name}"


BOGUS_416 = pytest.param(_bogus_416, id="_bogus_416")


@pytest.mark.parametrize("name", ["hparams.json", DATA])
@pytest.mark.parametrize("behave", [_length_short, _length_long, _drop_then_200, _drop_then_lying_416, BOGUS_416,
                                    _gzip, _html])
def test_a_lying_mirror_is_survived_with_an_honest_one_behind_it(hostile, name, behave, reference):
    hostile(name, behave, alone=False)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert "value" in out, out.get("error")
    assert torch.equal(out["value"], reference)


@pytest.mark.parametrize("name", ["hparams.json", DATA])
@pytest.mark.parametrize("behave", [_length_short, BOGUS_416, _drop_then_bogus_206, _gzip, _html])
def test_a_lying_only_mirror_is_a_one_line_error_naming_the_file(hostile, hub_env, name, behave):
    hostile(name, behave)
    out = _bounded(lambda: from_pretrained("gpt2-tiny"))
    assert "error" in out
    _typed(out["error"], name)
    assert name not in json.loads((hub_env / "openai/tiny/files.json").read_text())
    assert not (hub_env / "openai/tiny/raw" / name).exists()


def test_a_bogus_206_then_an_honest_mirror_still_yields_the_right_model(hostile, reference):
    hostile(DATA, _drop_then_bogus_206, alone=False)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert "value" in out, out.get("error")
    assert torch.equal(out["value"], reference)


# processes killed, locks deleted, read-only caches -----------------------------------------------------------------
def _worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while not pred():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"the worker never reached the stage (rc {proc.poll()}): {proc.communicate()[1][-500:]}")
        time.sleep(0.02)


def _partial(raw: Path, name: str, empty_ok: bool = False) -> bool:
    """Whether a partial download of `name` is on disk (holding some bytes, unless `empty_ok`)."""
    found = [p for p in raw.iterdir() if p.name.startswith(name + ".") and p.name.endswith(".incomplete")] \
        if raw.is_dir() else []
    return any((st := regular_file(p)) is not None and (empty_ok or st.st_size) for p in found)


@pytest.mark.parametrize("name,fault", [("hparams.json", {"kind": "stall", "after": 10, "delay": 4.0}),
                                        (DATA, {"kind": "slow", "delay": 0.03})])
def test_kill_9_mid_download_then_load_resumes(hub_env, server, name, fault, reference, capsys):
    """Killed while waiting on a stalled first file (its partial still empty), or half-way through the data file."""
    from server import Fault

    server.served.fault(f"/tiny/{name}", Fault(**fault))
    proc = _worker("download")
    _wait_for(lambda: _partial(hub_env / "openai/tiny/raw", name, empty_ok=fault["kind"] == "stall"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)
    assert verify(model_entry(hub_env, "tiny")) == []
    if fault["kind"] == "slow":  # the bytes on disk were kept: resumed with a Range request
        assert any(r for _, p, r in server.served.requests("GET") if p.endswith(name))
    _cli(capsys, "cache", "prune")
    assert not [p for p in (hub_env / "openai/tiny/raw").iterdir() if p.name.endswith(".incomplete")]


def test_kill_9_while_converting_during_the_download_leaves_a_temporary_file_that_prune_removes(hub_env, server,
                                                                                              capsys):
    from server import Fault

    server.served.fault(f"/tiny/{DATA}", Fault("slow", delay=0.03))
    converted = model_entry(hub_env, "tiny").converted
    proc = _worker("bfloat16")
    _wait_for(lambda: converted.is_dir() and any(p.name.endswith(".tmp") for p in converted.iterdir()), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left = [p for p in converted.iterdir() if p.name.endswith(".tmp")]
    assert left and left == [p for p in model_entry(hub_env, "tiny").partials() if p.parent == converted]
    model = from_pretrained("gpt2-tiny", dtype="bfloat16")
    assert torch.equal(model.tok_emb.weight, from_pretrained("gpt2-tiny").tok_emb.weight.to(torch.bfloat16))
    _cli(capsys, "cache", "prune")
    assert not [p for p in converted.iterdir() if p.name.endswith(".tmp")]
    assert verify(model_entry(hub_env, "tiny"), dtypes=("bfloat16",)) == []


def test_lock_file_deleted_mid_download(hub_env, server, reference):
    from server import Fault

    server.served.fault(f"/tiny/{DATA}", Fault("slow", delay=0.03))
    proc = _worker("download")
    _wait_for(lambda: _partial(hub_env / "openai/tiny/raw", DATA), proc)
    (hub_env / "locks/openai--tiny.lock").unlink()
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)  # a second process, not locked out
    _, err = proc.communicate(timeout=60)
    if proc.returncode:  # the first may fail, but with a typed error, not a FileNotFoundError
        assert err.strip().splitlines()[-1].startswith("gpt2hub.errors."), err[-800:]
    assert verify(model_entry(hub_env, "tiny")) == []
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)


def test_a_read_only_cache_loads_what_it_holds_and_names_itself_for_the_rest(hub_env, server, read_only, reference):
    from_pretrained("gpt2-tiny")
    read_only()
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)
    with pytest.raises(GPT2HubError) as e:
        from_pretrained("gpt2-tiny", dtype="bfloat16")
    _typed(e.value, str(hub_env), "GPT2HUB_CACHE")
