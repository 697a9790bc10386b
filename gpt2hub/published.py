"""The published-file check: is this file the one OpenAI (or the Hugging Face Hub) published?

One home for what gpt2hub knows of published files: exact sizes (from the format: OpenAI's data file is the
architecture's float32 tensors back to back; from the pins: the vocabulary files) and pinned sha256 values (facts
about the real files, from the registry). It is asked on arrival (`check`, before a file is recorded) and on every
load (`check_records`, so that a pin holds whatever was fetched, and a file kept under the opt-out is refused once
the opt-out is gone).

GPT2HUB_IGNORE_PINS=1 accepts files whose sha256 differs from the pin (a team mirror or a test server serving other
weights under the published names); it is said once per process and model, in one line naming the files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import IntegrityError
from .settings import ignore_pins

log = logging.getLogger("gpt2hub")
_warned: dict[tuple[str, str], set[str]] = {}  # (model, where) -> files named in an opt-out warning by this process


def _opt_out_note(label: str, names: list[str], where: str) -> None:
    """Say once per process, model and cache folder which files are used against their pins."""
    said = _warned.setdefault((label, where), set())
    if set(names) <= said:
        return
    said.update(names)
    log.warning("GPT2HUB_IGNORE_PINS is set: using %s's %s although they differ from the published files (%s)", label,
                ", ".join(sorted(names)), where)


@dataclass(frozen=True)
class Published:
    """What is known of one model's published files from one source (and revision).

    `label` names the model and source in messages; `pins` are pinned sha256 values, `sizes` exact byte sizes.
    Sizes that come with a pin are waived with it under the opt-out; `format_sizes` (the architecture's) never are.
    """

    label: str
    pins: Mapping[str, str] = field(default_factory=dict)
    pinned_sizes: Mapping[str, int] = field(default_factory=dict)
    format_sizes: Mapping[str, int] = field(default_factory=dict)

    def digest_kind(self, name: str) -> str:
        """sha256 for a pinned file (to compare with its pin), else the much cheaper crc32c (to notice damage)."""
        return "sha256" if name in self.pins else "crc32c"

    def size(self, name: str) -> int | None:
        """The exact size `name` must have, if known."""
        if name in self.format_sizes:
            return self.format_sizes[name]
        return None if ignore_pins() else self.pinned_sizes.get(name)

    def check(self, name: str, size: int, digest: str, where: str) -> None:
        """Raise IntegrityError ("is N bytes, expected M" / "has sha256 ...") unless `name` of `size` bytes and
        `digest` (of `digest_kind(name)`) is the published file; `where` (its path or URL) is named on the opt-out."""
        expected = self.size(name)
        if expected is not None and size != expected:
            raise IntegrityError(f"is {size} bytes, expected {expected}")
        pin = self.pins.get(name)
        if pin is None or digest == pin:
            return
        if not ignore_pins():
            raise IntegrityError(f"has sha256 {digest}, but the published file's is {pin} (pinned); a server that serves "
                                 "other weights under these names needs GPT2HUB_IGNORE_PINS=1")

    def check_records(self, records: Mapping[str, Mapping], where: str, fix: str) -> None:
        """On load: refuse (IntegrityError naming `where` and `fix`) each recorded file whose sha256 is not its pin,
        unless GPT2HUB_IGNORE_PINS is set (then said once per process)."""
        off = sorted(n for n, pin in self.pins.items() if (have := records.get(n, {}).get("sha256")) and have != pin)
        if not off:
            return
        if not ignore_pins():
            raise IntegrityError(f"{self.label}: {', '.join(off)} in {where} differ from the published files' pinned "
                                 "sha256 (kept under GPT2HUB_IGNORE_PINS=1, or fetched through another revision): set "
                                 f"GPT2HUB_IGNORE_PINS=1 to use them anyway, or {fix}")
        _opt_out_note(self.label, off, where)
