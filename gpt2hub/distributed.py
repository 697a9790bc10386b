"""Loading inside a torch.distributed process group: one rank per cache fetches and converts, the others wait.

Without coordination every rank of a job would race for the same cache: the lock keeps that correct, but on a
network filesystem that may not honour flock each node could download the same gigabytes. Here the ranks agree
instead, using the process group itself:

- node-local caches (the default): local rank 0 of each node prepares its node's cache (LOCAL_RANK, else the ranks'
  host names; a node where no rank has LOCAL_RANK 0 gets its lowest global rank, with a warning);
- a cache shared by every node (`shared_cache=True` or GPT2HUB_SHARED_CACHE=1): global rank 0 alone prepares it.

Every other rank waits in a collective of the group (no file lock, no polling), then reads the prepared cache with
network access off. The collective carries the preparing ranks' outcome: if one failed, every rank raises its error
(same type, naming the rank), so no rank waits forever or trains with a model others lack. Waiting ranks wait at
most the group's timeout (`init_process_group(timeout=...)`).

Collectives run on CPU tensors: on the default group when its backend has a CPU side (gloo, "cpu:gloo,cuda:nccl",
mpi), else on a gloo group created once beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import errors
from .errors import quoted
from .files import env_flag

if TYPE_CHECKING:  # torch.distributed is imported where used: a build without it still loads this module
    from torch.distributed import ProcessGroup

log = logging.getLogger("gpt2hub")
_MESSAGE_BYTES = 4096
_groups: dict[ProcessGroup | None, ProcessGroup | None] = {}  # default group -> the CPU-capable group used beside it


def in_group() -> bool:
    """Whether torch.distributed is available and its default process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def shared(shared_cache: bool | None = None) -> bool:
    """The `shared_cache` argument if given, else GPT2HUB_SHARED_CACHE."""
    return env_flag("GPT2HUB_SHARED_CACHE") if shared_cache is None else bool(shared_cache)


def prepare_once(prepare: Callable[[], object], shared_cache: bool | None = None) -> bool:
    """Run `prepare` on one rank per cache while the others wait on the group; raise everywhere if it failed.

    Outside an initialised process group nothing runs and the result is False. Inside one, the result is True once
    every preparing rank has succeeded: every rank may then read the cache without network access.
    """
    if not in_group():
        return False
    import torch.distributed as dist

    group = _cpu_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    failure: BaseException | None = None
    if preparer(shared_cache, group):
        try:
            prepare()
        except Exception as e:  # every rank must reach the collective below, or the others would hang
            failure = e
    failed = torch.tensor([rank if failure is not None else world], dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MIN, group=group)  # the barrier: nobody passes before every preparer
    first = int(failed.item())
    if first == world:
        return True
    message = _broadcast_text(f"{type(failure).__name__}\n{failure}" if rank == first else "", first, group)
    if failure is not None:
        raise failure
    raise _error(message, first)


def preparer(shared_cache: bool | None = None, group: ProcessGroup | None = None) -> bool:
    """Whether this rank prepares the cache: global rank 0 for a shared cache, else local rank 0 of its node.

    The ranks first exchange their host and LOCAL_RANK (one all_gather, made by every rank alike), so that they
    agree: a host on which no rank has LOCAL_RANK 0 (a launcher counting from 1, a LOCAL_RANK copied to every rank)
    gets its lowest global rank as preparer, with a warning, instead of every rank waiting for a preparer that never
    comes. A LOCAL_RANK that is not a whole number >= 0 is an error on every rank (SettingError naming it).
    """
    import torch.distributed as dist

    me = dist.get_rank()
    ranks = _hosts_and_local_ranks(group)
    bad = [r for r, (_, local) in enumerate(ranks) if local == _INVALID]
    if bad:
        raise _bad_local_rank(None if me in bad else bad[0])
    if shared(shared_cache):
        return me == 0
    host, local = ranks[me]
    same_host = [r for r, (h, _) in enumerate(ranks) if h == host]
    if any(ranks[r][1] == 0 for r in same_host):
        return local == 0
    if me == same_host[0] and local != _UNSET:
        log.warning("no rank on %s has LOCAL_RANK 0 (theirs: %s): rank %d prepares this node's cache", socket.gethostname(),
                    sorted({ranks[r][1] for r in same_host}), me)
    return me == same_host[0]


_UNSET, _INVALID = -1, -2  # LOCAL_RANK as exchanged: unset, or not a whole number >= 0


def _local_rank_env() -> int:
    """LOCAL_RANK as a number, _UNSET or _INVALID."""
    raw = os.environ.get("LOCAL_RANK")
    if raw is None:
        return _UNSET
    try:
        value = int(raw.strip())
    except ValueError:
        return _INVALID
    return value if 0 <= value < 1 << 31 else _INVALID


def _bad_local_rank(rank: int | None) -> errors.SettingError:
    """The error for this rank's LOCAL_RANK (rank None) or another rank's."""
    what = (f"LOCAL_RANK={quoted(os.environ.get('LOCAL_RANK'))} is not a whole number >= 0" if rank is None
            else f"rank {rank}'s LOCAL_RANK is not a whole number >= 0, so no rank loads the model")
    return errors.SettingError(f"{what}: unset it, or set it to each process's rank on its node (torchrun does)")


def _hosts_and_local_ranks(group: ProcessGroup | None) -> list[tuple[int, int]]:
    """(host id, LOCAL_RANK as _local_rank_env gives it) of every rank, by global rank."""
    import torch.distributed as dist

    host = int.from_bytes(hashlib.sha256(socket.gethostname().encode()).digest()[:7], "big")
    mine = torch.tensor([host, _local_rank_env()], dtype=torch.int64)
    every = [torch.zeros(2, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine, group=group)
    return [(int(t[0]), int(t[1])) for t in every]


def local_rank(group: ProcessGroup | None = None) -> int:
    """LOCAL_RANK (set by torchrun and most launchers), else this rank's position among the ranks of its host.

    A LOCAL_RANK that is not a whole number >= 0 is a SettingError naming it. Without LOCAL_RANK this is a collective:
    every rank of the group must call it.
    """
    value = _local_rank_env()
    if value == _INVALID:
        raise _bad_local_rank(None)
    if value != _UNSET:
        return value
    import torch.distributed as dist

    ranks = _hosts_and_local_ranks(group)
    host = ranks[dist.get_rank()][0]
    return sum(h == host for h, _ in ranks[:dist.get_rank()])


def _cpu_group() -> ProcessGroup | None:
    """The default group if its backend takes CPU tensors, else a gloo group over the same ranks (made once)."""
    import torch.distributed as dist

    backend = str(dist.get_backend())
    if "gloo" in backend or backend == "mpi":
        return None
    world = dist.group.WORLD
    if world not in _groups:
        _groups.clear()  # a group of an earlier, destroyed default group is of no use
        _groups[world] = dist.new_group(backend="gloo")
    return _groups[world]


def _broadcast_text(text: str, src: int, group: ProcessGroup | None) -> str:
    import torch.distributed as dist

    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    data = text.encode()[:_MESSAGE_BYTES]
    buf[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(buf, src=src, group=group)
    return bytes(buf.tolist()).rstrip(b"\0").decode(errors="replace")


def _error(message: str, rank: int) -> Exception:
    """The preparing rank's error, re-made here: the same gpt2hub error type (or ValueError), else GPT2HubError."""
    kind, _, text = message.partition("\n")
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.GPT2HubError)):
        cls = ValueError if kind == "ValueError" else errors.GPT2HubError
    return cls(f"rank {rank} failed to prepare the model in its cache, so no rank loads it: {text}")
