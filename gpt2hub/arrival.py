"""The gate every file passes on its way into the cache: the format's arrival check and the published-file check.

A transport (transports.py) brings bytes; it cannot record them. `Entry.record` takes only an `Accepted`, and only a
`Gate` the entry made produces one, after checking the file at hand: its exact size where known, its digest against
the pin (published.py), its structure (formats.py). So a new transport cannot skip the published-file check, and
a file that fails it is never recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import Entry
from .config import ModelConfig
from .errors import IntegrityError
from .files import DIGESTS, regular_file
from .formats import Format
from .published import Published

if TYPE_CHECKING:
    from .streaming import StreamedWeights


@dataclass(frozen=True)
class Accepted:
    """A file that passed its gate: its name, its record (size, digest, what the format checked) and where it came
    from (`origin`: the URL, or its path in Hugging Face's cache)."""

    name: str
    record: dict
    gate: Gate
    origin: dict = field(default_factory=dict)

    def at(self, **origin: Any) -> Accepted:
        """The same file, with where it came from added to its record."""
        return replace(self, record={**self.record, **origin}, origin={**self.origin, **origin})


class Gate:
    """What the file `name` of `entry` must be: made by the hub for each file it fetches, called by the transport on
    the complete bytes (under a temporary name or in place) before they take their final name."""

    def __init__(self, entry: Entry, name: str, fmt: Format, published: Published, cfg: ModelConfig,
                 tap: StreamedWeights | None = None):
        self.entry, self.name, self.fmt, self.published, self.cfg = entry, entry.check_name(name), fmt, published, cfg
        self.tap = tap  # sees the weights file's bytes as they arrive: checks (and converts) each tensor on the way
        self.expected_size = published.size(name)
        self.digest_kind = published.digest_kind(name)

    def __call__(self, path: Path, digest: str | None = None, where: str = "") -> Accepted:
        """Accept the complete file at `path` (`digest`: its `digest_kind` digest, if the transport took it while
        the bytes arrived), or raise IntegrityError saying what is wrong ("is 12 bytes, expected 90", "has sha256
        ...", "is not a valid hparams.json: ...")."""
        st = regular_file(path, follow=True)
        if st is None:
            raise IntegrityError("is not a regular file")
        if self.expected_size is not None and st.st_size != self.expected_size:
            raise IntegrityError(f"is {st.st_size} bytes, expected {self.expected_size}")
        digest = digest or DIGESTS[self.digest_kind](path)
        self.published.check(self.name, st.st_size, digest, where or str(path))
        streamed = self.tap is not None and self.tap.complete(path)
        others = {n: p for n, p in self.entry.paths(self.fmt.files).items() if n != self.name}
        extra = self.fmt.check(self.name, path, self.cfg, others, streamed)
        return Accepted(self.name, {"size": st.st_size, self.digest_kind: digest, **extra}, self)
