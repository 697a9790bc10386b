"""Servers that lie about progress: a trickle (one byte every few seconds, which no read timeout notices) and a 206
reply that starts elsewhere than the Range request asked. Windows and delays are made small through the settings."""

from __future__ import annotations

import logging
import os

import pytest
from server import Fault, FileServer

from gpt2hub import DownloadError, SettingError
from gpt2hub.download import download

BODY = bytes(range(256)) * 40  # 10 KiB


@pytest.fixture
def files():
    srv = FileServer()
    srv.served.files["/f.bin"] = BODY
    yield srv
    srv.close()


@pytest.fixture
def fast_window(monkeypatch):
    """A stall is fewer than 2000 bytes a second over 0.3 s; a trickle of one byte per 0.05 s is 20 bytes a second."""
    monkeypatch.setenv("GPT2HUB_MIN_RATE", "2000")
    monkeypatch.setenv("GPT2HUB_RATE_WINDOW", "0.3")


def _ranges(srv) -> list[str | None]:
    return [r for _, _, r in srv.served.requests("GET", "/f.bin")]


def test_a_trickling_server_counts_as_stalled_and_is_resumed_with_range(files, fast_window, sleeps, tmp_path, caplog):
    files.served.fault("/f.bin", Fault("trickle", delay=0.05))
    dest = tmp_path / "f.bin"
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        record = download(f"{files.url}/f.bin", dest, timeout=30)  # the read timeout alone would wait 30 s a byte
    assert dest.read_bytes() == BODY and record["size"] == len(BODY)
    first, second = _ranges(files)
    assert first is None and second is not None and second.startswith("bytes=") and second != "bytes=0-"
    assert "GPT2HUB_MIN_RATE=2000" in caplog.text and "GPT2HUB_RATE_WINDOW=0.3" in caplog.text
    assert len(sleeps) == 1  # one retry, with backoff


def test_a_server_that_always_trickles_is_given_up_naming_the_setting(files, fast_window, sleeps, tmp_path):
    files.served.fault("/f.bin", Fault("trickle", delay=0.05, times=10))
    with pytest.raises(DownloadError, match=r"below GPT2HUB_MIN_RATE=2000.*after 3 attempts.*run again to resume"):
        download(f"{files.url}/f.bin", tmp_path / "f.bin", retries=2, timeout=30)
    assert len(_ranges(files)) == 3
    [part] = tmp_path.glob("f.bin.*.incomplete")
    assert 0 < part.stat().st_size < len(BODY)  # the bytes that came are kept for the next run


def test_min_rate_zero_turns_the_check_off(files, monkeypatch, sleeps, tmp_path):
    monkeypatch.setenv("GPT2HUB_MIN_RATE", "0")
    monkeypatch.setenv("GPT2HUB_RATE_WINDOW", "0.05")
    files.served.files["/f.bin"] = BODY[:30]
    files.served.fault("/f.bin", Fault("trickle", delay=0.01))  # 100 bytes a second, for 0.3 s
    download(f"{files.url}/f.bin", tmp_path / "f.bin", timeout=30)
    assert _ranges(files) == [None] and not sleeps


@pytest.mark.parametrize("var, value", [("GPT2HUB_MIN_RATE", "fast"), ("GPT2HUB_MIN_RATE", "-1"),
                                        ("GPT2HUB_MIN_RATE", "inf"), ("GPT2HUB_RATE_WINDOW", "soon")])
def test_a_bad_rate_setting_is_an_error_naming_it(files, monkeypatch, tmp_path, var, value):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingError, match=var) as err:
        download(f"{files.url}/f.bin", tmp_path / "f.bin")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_a_206_at_the_wrong_offset_discards_the_partial_file_and_starts_over(files, sleeps, tmp_path, caplog):
    dest = tmp_path / "f.bin"
    left = tmp_path / "f.bin.4242.incomplete"  # an earlier run's partial download
    left.write_bytes(BODY[:1000])
    files.served.fault("/f.bin", Fault("bad_range", after=500))
    with caplog.at_level(logging.WARNING, logger="gpt2hub"):
        download(f"{files.url}/f.bin", dest)
    assert dest.read_bytes() == BODY and not list(tmp_path.glob("*.incomplete"))
    assert _ranges(files) == ["bytes=1000-", None]  # the second request starts over, without Range
    assert "discarding the 1000 bytes downloaded and starting over" in caplog.text
    assert "bytes 1500-" in caplog.text


def test_a_run_that_ends_on_a_206_at_the_wrong_offset_leaves_the_next_run_a_clean_start(files, sleeps, tmp_path):
    left = tmp_path / f"f.bin.{os.getpid()}.incomplete"
    left.write_bytes(BODY[:1000])
    files.served.fault("/f.bin", Fault("bad_range", after=500))
    with pytest.raises(DownloadError, match="starting over"):
        download(f"{files.url}/f.bin", tmp_path / "f.bin", retries=0)
    assert not left.exists()  # was kept, and every later run failed the same way until `cache prune`
    download(f"{files.url}/f.bin", tmp_path / "f.bin", retries=0)
    assert _ranges(files) == ["bytes=1000-", None] and (tmp_path / "f.bin").read_bytes() == BODY
