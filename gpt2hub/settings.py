"""gpt2hub's environment variables, read in one place: each bad value is an error naming the variable and what it
accepts, never a silent default.

| variable | meaning |
| --- | --- |
| GPT2HUB_CACHE | the cache folder: an absolute path (`~` expanded); a relative or blank one is refused |
| GPT2HUB_OFFLINE, HF_HUB_OFFLINE | no network at all |
| GPT2HUB_IGNORE_PINS | accept published files whose sha256 differs from the pinned one (warned once per process) |
| GPT2HUB_DISABLE_PROGRESS_BARS, HF_HUB_DISABLE_PROGRESS_BARS | no progress bars |
| GPT2HUB_SHARED_CACHE | inside torch.distributed, one cache shared by every node |
| GPT2HUB_LOCK_TIMEOUT | seconds to wait for another process's lock (default 600; 0 gives up at once) |
| GPT2HUB_READ_TIMEOUT | seconds without a byte before a download counts as stalled (default 60; more than 0) |
| GPT2HUB_MIN_RATE | bytes a second below which a download counts as stalled (default 1024; 0 turns the check off) |
| GPT2HUB_RATE_WINDOW | seconds over which GPT2HUB_MIN_RATE is measured (default 30; more than 0) |

Booleans accept 1/0, true/false, yes/no, on/off (any case); anything else (`ture`, `enabled`) is an error.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import SettingError

TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")
DAY = 86400.0


def env_flag(name: str) -> bool:
    """A boolean variable: unset or empty is False; an unknown spelling is a SettingError naming it."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise SettingError(f"{name}={raw[:40]!r} is not a boolean: set it to 1 (on) or 0 (off), or unset it")


def env_seconds(name: str, default: float, *, low: float = 0.0, high: float = DAY, allow_low: bool = True,
                what: str = "a number of seconds") -> float:
    """A number (of seconds, or `what`) from the environment, within [low, high] (`allow_low=False`: more than
    `low`)."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    ok = (value >= low if allow_low else value > low) and value <= high
    if not ok:
        side = ">=" if allow_low else ">"
        raise SettingError(f"{name}={raw[:40]!r} is not {what} {side} {low:g} and <= {high:g}: set it to one, or "
                           f"unset it (default {default:g})")
    return value


def offline() -> bool:
    """GPT2HUB_OFFLINE or HF_HUB_OFFLINE: no network request at all."""
    return env_flag("GPT2HUB_OFFLINE") or env_flag("HF_HUB_OFFLINE")


def ignore_pins() -> bool:
    """GPT2HUB_IGNORE_PINS=1: accept published files whose sha256 differs from the pinned one (loudly, once)."""
    return env_flag("GPT2HUB_IGNORE_PINS")


def progress_disabled() -> bool:
    return env_flag("GPT2HUB_DISABLE_PROGRESS_BARS") or env_flag("HF_HUB_DISABLE_PROGRESS_BARS")


def lock_timeout() -> float:
    return env_seconds("GPT2HUB_LOCK_TIMEOUT", 600.0, high=7 * DAY)


def read_timeout() -> float:
    return env_seconds("GPT2HUB_READ_TIMEOUT", 60.0, high=DAY, allow_low=False)


MIN_RATE, RATE_WINDOW = 1024.0, 30.0  # defaults of GPT2HUB_MIN_RATE (bytes per second) and GPT2HUB_RATE_WINDOW (s)


def min_rate() -> tuple[float, float]:
    """(GPT2HUB_MIN_RATE in bytes per second, GPT2HUB_RATE_WINDOW in seconds): a download bringing fewer than
    rate x window bytes in a window counts as stalled and is resumed."""
    rate = env_seconds("GPT2HUB_MIN_RATE", MIN_RATE, high=float(1 << 40), what="a number of bytes per second")
    return rate, env_seconds("GPT2HUB_RATE_WINDOW", RATE_WINDOW, high=DAY, allow_low=False)


def default_root() -> Path:
    """GPT2HUB_CACHE (an absolute path, `~` expanded), else the platform's user cache folder (~/.cache/gpt2hub)."""
    raw = os.environ.get("GPT2HUB_CACHE")
    if raw is not None and raw != "":
        path = Path(raw.strip()).expanduser() if raw.strip() else None
        if path is None or not path.is_absolute():
            raise SettingError(f"GPT2HUB_CACHE={raw[:80]!r} is not an absolute path (a relative one would make a cache in "
                               "every working folder): set it to a full path such as ~/.cache/gpt2hub, or unset it")
        return path
    import platformdirs

    return Path(platformdirs.user_cache_dir("gpt2hub"))


def check_settings() -> None:
    """Read every setting now, so that a bad value is an error before any work rather than in the middle of it."""
    for flag in ("GPT2HUB_OFFLINE", "HF_HUB_OFFLINE", "GPT2HUB_IGNORE_PINS", "GPT2HUB_DISABLE_PROGRESS_BARS",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "GPT2HUB_SHARED_CACHE"):
        env_flag(flag)
    lock_timeout()
    read_timeout()
    min_rate()
