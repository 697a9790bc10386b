"""Step 2 of the load path: one model's published files in its cache entry, each fetched through its gate when it is
missing or damaged, under the entry's lock; the pins checked on every call, whatever fetched the files."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .arrival import Gate
from .cache import Entry
from .checks import verify
from .errors import OfflineError
from .files import sha256_file
from .registry import ModelSpec
from .settings import offline
from .transports import Transport

if TYPE_CHECKING:  # storages are torch's side: fetching (`gpt2hub download`) needs none of it
    from .storage import Storage
    from .streaming import StreamedWeights

log = logging.getLogger("gpt2hub")


@dataclass
class Arrived:
    """What the fetch step leaves for the storage: the files fetched in this call (their digests and arrival checks
    just taken) and the tap that saw the weights file arrive, if any (`close` removes what it made and was not used)."""

    fresh: set[str] = field(default_factory=set)
    tap: StreamedWeights | None = None

    def streamed(self, weights: Path) -> bool:
        """Whether the tap saw the weights file now at `weights` arrive whole, every tensor passing its check."""
        return self.tap is not None and self.tap.complete(weights)

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()


class Fetcher:
    """Fetches what an entry lacks from a transport, each file through a `Gate` (arrival.py)."""

    def __init__(self, spec: ModelSpec, transport: Transport, entry: Entry, offline_: bool):
        self.spec, self.transport, self.entry, self.offline = spec, transport, entry, offline_
        self.fmt, self.published = transport.format, transport.published()

    def __call__(self, names: tuple[str, ...], force: bool = False, store: Storage | None = None) -> Arrived:
        """Fetch what is missing or damaged among `names` (all with `force`); the pins are checked on every call."""
        problems = [] if force else verify(self.entry, names, (), quick=True)
        arrived = Arrived()
        if force or problems:
            missing = list(names) if force else [p.name for p in problems]
            if self.offline and not self.transport.serves_offline:  # (the Hub's own offline mode names what it lacks)
                raise OfflineError(f"{self.spec.name} ({self.transport.key}) is not fully cached and {_why_offline()}: "
                                   f"missing {', '.join(missing)} in {self.entry.dir}. Run `gpt2hub download "
                                   f"{self.spec.name}` with network access first")
            with self.entry.lock(f"downloading {self.spec.name} from {self.transport.key}"):
                arrived = self._repair(names, force, store)
        self.check_pins()
        return arrived

    def check_pins(self, records: dict[str, dict] | None = None) -> None:
        """Every pinned file the entry holds must be the published one, whatever revision fetched it: one recorded
        without a sha256 is hashed once now (see published.py; GPT2HUB_IGNORE_PINS=1 lets it through, loudly).
        `records` are the entry's, if the caller read them already."""
        records = self.entry.records() if records is None else records
        for name in self.published.pins:
            if (record := records.get(name)) is not None and "sha256" not in record:
                path = self.entry.file_path(name, record)
                records[name] = self.entry.add_sha256(name, record, sha256_file(path))
        self.published.check_records(records, str(self.entry.dir),
                                     f"run `gpt2hub cache rm {self.spec.name}` to download the published files")

    def _repair(self, names: tuple[str, ...], force: bool, store: Storage | None) -> Arrived:
        """Under the lock: fetch every file still missing or damaged. A damaged file is discarded first (for the hf
        source, with its blob); the weights file comes last, so that its tap can use the index and config."""
        problems = [] if force else verify(self.entry, names, (), quick=True)  # another process may have fetched them
        for p in problems:
            if p.what not in ("not downloaded", "missing"):
                log.warning("%s", p)
            if p.what != "not downloaded":
                self.entry.discard(p.name)
        todo = sorted(names if force else dict.fromkeys(p.name for p in problems), key=lambda n: n == self.fmt.weights_file)
        arrived = Arrived()
        try:
            for name in todo:
                tap = None
                if store is not None and name == self.fmt.weights_file:
                    arrived.tap = tap = store.tap(self.fmt, self.entry, self.entry.paths(), self.spec.arch)
                gate = Gate(self.entry, name, self.fmt, self.published, self.spec.arch, tap)
                start = time.perf_counter()
                accepted = self.transport.fetch(self.entry, gate, force)
                self.entry.record(accepted)
                arrived.fresh.add(name)
                log.info("fetched %s (%d bytes) from %s in %.2f s, %s checked", name, accepted.record["size"],
                         accepted.origin.get("url") or accepted.origin.get("path") or "a copy already in the cache",
                         time.perf_counter() - start, gate.digest_kind)
        except BaseException:
            arrived.close()
            raise
        finally:
            self.transport.done()
        return arrived



def _why_offline() -> str:
    return "GPT2HUB_OFFLINE/HF_HUB_OFFLINE is set" if offline() else "local_files_only=True"
