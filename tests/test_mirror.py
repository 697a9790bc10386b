"""`gpt2hub mirror`: the cache written out in OpenAI's layout, served by a plain HTTP server to another machine."""

import errno
import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY

import gpt2hub.mirror
from gpt2hub import CacheError, IntegrityError, from_pretrained
from gpt2hub.cli import main
from gpt2hub.inventory import model_entry
from gpt2hub.mirror import write_mirror
from gpt2hub.registry import DATA_FILE, OPENAI_FILES


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None])


def _sums(folder) -> dict[str, str]:
    return {line.split("  ")[1]: line.split("  ")[0] for line in (folder / "SHA256SUMS").read_text().splitlines()}


def _serve(folder) -> tuple[subprocess.Popen, str]:
    """`python -m http.server` on 127.0.0.1 and a port the system picks; its first line says which."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "-d", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (...)", printed once it listens
    return proc, f"http://127.0.0.1:{int(line.split(' port ')[1].split()[0])}"


def test_a_mirror_served_by_http_server_feeds_another_machine(hub_env, server, tmp_path, monkeypatch, capsys):
    expected = _logits(from_pretrained("gpt2-tiny"))
    folder = tmp_path / "srv"
    assert main(["mirror", str(folder)]) == 0
    assert "python -m http.server" in capsys.readouterr().out
    raw = model_entry(hub_env, TINY.name).raw
    for name in OPENAI_FILES:  # copies: editing the mirror can never change the cache
        assert not os.path.samefile(folder / TINY.size / name, raw / name)
        assert (folder / TINY.size / name).read_bytes() == (raw / name).read_bytes()
    assert sorted(_sums(folder)) == [f"{TINY.size}/{n}" for n in OPENAI_FILES]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count(": OK") == len(OPENAI_FILES), check.stdout
    before = len(server.served.log)
    proc, url = _serve(folder)
    try:
        monkeypatch.setenv("GPT2HUB_OPENAI_URL", url)
        monkeypatch.setenv("GPT2HUB_CACHE", str(tmp_path / "other-machine"))
        assert torch.equal(_logits(from_pretrained("gpt2-tiny")), expected)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert len(server.served.log) == before  # the original server saw nothing
    records = model_entry(tmp_path / "other-machine", TINY.name).records()
    assert all(records[n]["url"] == f"{url}/{TINY.size}/{n}" for n in OPENAI_FILES)


def test_across_filesystems_files_are_copied(hub_env, server, tmp_path, monkeypatch):
    from_pretrained("gpt2-tiny")

    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(gpt2hub.mirror.os, "link", no_link)
    written = write_mirror(tmp_path / "srv")
    assert {f.how for f in written} <= {"reflink", "copy_file_range", "copy"} and len(written) == len(OPENAI_FILES)
    raw = model_entry(hub_env, TINY.name).raw
    for f in written:
        assert not os.path.samefile(f.path, raw / f.path.name)
        assert f.path.read_bytes() == (raw / f.path.name).read_bytes()
        assert hashlib.sha256(f.path.read_bytes()).hexdigest() == f.sha256 == _sums(tmp_path / "srv")[f"tiny/{f.path.name}"]


@pytest.mark.parametrize("keep_mtime", [True, False])
def test_a_damaged_cached_file_is_refused(hub_env, server, tmp_path, keep_mtime):
    from_pretrained("gpt2-tiny")
    data = model_entry(hub_env, TINY.name).raw / DATA_FILE
    st = data.stat()
    with open(data, "r+b") as f:  # one flipped bit, the size unchanged
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    if keep_mtime:  # a change the quick check cannot see: caught by hashing the bytes being mirrored
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match=DATA_FILE):
        write_mirror(tmp_path / "srv")
    assert not (tmp_path / "srv" / TINY.size / DATA_FILE).exists()
    assert not list((tmp_path / "srv").rglob("*.tmp"))
    assert not (tmp_path / "srv" / "SHA256SUMS").exists()


def test_links_out_of_the_cache_are_not_followed(hub_env, server, tmp_path):
    from_pretrained("gpt2-tiny")
    cache = model_entry(hub_env, TINY.name)
    outside = tmp_path / "outside"
    shutil.move(cache.raw, outside)
    cache.raw.symlink_to(outside)  # the raw folder itself a link: each file in it looks like a regular file
    before = sorted(p.name for p in outside.iterdir())
    with pytest.raises(IntegrityError, match="missing"):  # the link is dropped from the cache, never followed
        write_mirror(tmp_path / "srv")
    assert not cache.raw.is_symlink() and sorted(p.name for p in outside.iterdir()) == before
    assert not (tmp_path / "srv" / TINY.size).exists() or not any((tmp_path / "srv" / TINY.size).iterdir())
    shutil.rmtree(cache.raw, ignore_errors=True)
    shutil.move(outside, cache.raw)
    (cache.raw / "vocab.bpe").unlink()
    (cache.raw / "vocab.bpe").symlink_to(tmp_path / "anything")  # a file replaced by a link
    with pytest.raises(IntegrityError, match="vocab.bpe"):
        write_mirror(tmp_path / "srv")
    assert not (tmp_path / "srv" / TINY.size / "vocab.bpe").exists()


def test_names_errors_and_sums_of_other_models_kept(hub_env, server, tmp_path, capsys):
    with pytest.raises(CacheError, match="gpt2hub download NAME"):
        write_mirror(tmp_path / "srv")
    from_pretrained("gpt2-tiny")
    assert main(["mirror", str(tmp_path / "srv"), "gpt2-small"]) == 1
    assert "gpt2-small is not fully cached" in capsys.readouterr().err
    srv = tmp_path / "srv"
    (srv / "355M").mkdir(parents=True)
    (srv / "355M" / "hparams.json").write_text("{}\n")
    kept, gone = f"{'a' * 64}  355M/hparams.json", f"{'b' * 64}  355M/vocab.bpe"
    (srv / "SHA256SUMS").write_text(f"{kept}\n{gone}\n{'c' * 64}  tiny/stale\n")
    written = write_mirror(srv, ["gpt2-tiny"])
    assert [f.path.name for f in written] == list(OPENAI_FILES)
    lines = (srv / "SHA256SUMS").read_text().splitlines()
    assert kept in lines and gone not in lines and len(lines) == 1 + len(OPENAI_FILES)  # a file no longer there is dropped
    assert write_mirror(srv, ["tiny"]) == written  # running again gives the same mirror


def test_a_file_kept_under_ignore_pins_needs_the_opt_out_to_be_mirrored(hub_env, server, tmp_path, monkeypatch):
    served = server.served.files[f"/{TINY.size}/vocab.bpe"]
    server.served.files[f"/{TINY.size}/vocab.bpe"] = served + b"a b\n"  # not the published file
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")
    gpt2hub.download_files("gpt2-tiny")  # kept under the opt-out
    monkeypatch.delenv("GPT2HUB_IGNORE_PINS")
    cache = model_entry(hub_env, TINY.name)
    with pytest.raises(IntegrityError, match="GPT2HUB_IGNORE_PINS"):
        write_mirror(tmp_path / "srv")
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")
    written = {f.path.name: f for f in write_mirror(tmp_path / "srv")}
    assert written["vocab.bpe"].sha256 == cache.records()["vocab.bpe"]["sha256"]
