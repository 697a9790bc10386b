"""from_pretrained in a torch.distributed process group: one rank per cache fetches, the others wait on the group.

Each test launches real torchrun jobs (gloo, CPU) against the test server and counts its requests. A slow data file
makes the ranks overlap, so a rank that went for the cache itself would be seen waiting for the lock ("waiting for").
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import TINY
from server import Fault

from gpt2hub import SettingError, distributed, from_pretrained
from gpt2hub.registry import DATA_FILE, OPENAI_FILES

WORKER = str(Path(__file__).parent / "dist_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _gets(server) -> dict[str, int]:
    return {n: len(server.served.requests("GET", f"/{TINY.size}/{n}")) for n in OPENAI_FILES}


def _env(out: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "GPT2HUB_SHARED_CACHE")}
    return {**env, "GPT2HUB_CACHE": str(cache), "GPT2HUB_TEST_OUT": str(out), "OMP_NUM_THREADS": "1", **extra}


def _outcomes(out: Path, world: int, runs: list | None = None) -> list[str]:
    missing = [r for r in range(world) if not (out / f"rank{r}.txt").exists()]
    assert not missing, (missing, [(r.returncode, r.stderr[-3000:]) for r in runs or []])
    return [(out / f"rank{r}.txt").read_text() for r in range(world)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(out: Path, caches: tuple[Path, Path], **extra: str) -> list[subprocess.CompletedProcess]:
    """Two simulated nodes of two ranks each, on this machine, each torchrun with its own environment."""
    port = _free_port()
    procs = [subprocess.Popen([*TORCHRUN, "--nnodes", "2", "--node-rank", str(i), "--nproc-per-node", "2",
                               "--master-addr", "127.0.0.1", "--master-port", str(port), WORKER],
                              env=_env(out, caches[i], **extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # only after a timeout: torchrun passes SIGTERM on to its ranks
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=60)
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs, strict=True)]


def _check_all_ok(runs: list, outcomes: list[str]) -> None:
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    assert all(o.startswith("ok ") for o in outcomes) and len(set(outcomes)) == 1, outcomes
    assert not any("waiting for" in r.stderr for r in runs)  # no rank went for the lock while another prepared


def test_four_ranks_on_one_node_fetch_each_file_once(hub_env, server, tmp_path):
    server.served.fault(f"/tiny/{DATA_FILE}", Fault("slow", delay=0.01))
    run = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "4", WORKER], env=_env(tmp_path, hub_env),
                         capture_output=True, text=True, timeout=120)
    _check_all_ok([run], _outcomes(tmp_path, 4, [run]))
    assert _gets(server) == dict.fromkeys(OPENAI_FILES, 1)


def test_two_nodes_with_their_own_caches_fetch_once_per_cache(hub_env, server, tmp_path):
    server.served.fault(f"/tiny/{DATA_FILE}", Fault("slow", delay=0.01, times=2))
    runs = _two_nodes(tmp_path, (tmp_path / "node0", tmp_path / "node1"))
    _check_all_ok(runs, _outcomes(tmp_path, 4, runs))
    assert _gets(server) == dict.fromkeys(OPENAI_FILES, 2)
    assert all((tmp_path / f"node{i}/openai/tiny/raw" / DATA_FILE).is_file() for i in range(2))


def test_a_cache_shared_by_two_nodes_is_fetched_once_by_rank_0(hub_env, server, tmp_path):
    server.served.fault(f"/tiny/{DATA_FILE}", Fault("slow", delay=0.01))
    runs = _two_nodes(tmp_path, (hub_env, hub_env), GPT2HUB_SHARED_CACHE="1")
    _check_all_ok(runs, _outcomes(tmp_path, 4, runs))  # without the flag, local rank 0 of node 1 would wait for the lock
    assert _gets(server) == dict.fromkeys(OPENAI_FILES, 1)


def test_a_failure_on_the_preparing_rank_is_raised_on_every_rank(hub_env, server, tmp_path):
    server.served.fault(f"/tiny/{DATA_FILE}", Fault("status", status=404, times=100))
    run = subprocess.run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", WORKER], env=_env(tmp_path, hub_env),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = _outcomes(tmp_path, 2)
    assert first.startswith("error DownloadError could not download model.ckpt.data"), first
    assert second.startswith("error DownloadError rank 0 failed") and "could not download model.ckpt.data" in second
    assert len(_gets(server)) == len(OPENAI_FILES) and _gets(server)[DATA_FILE] >= 1


def test_outside_a_process_group_nothing_changes(hub_env, server):
    ran = []
    assert not distributed.in_group()
    assert distributed.prepare_once(lambda: ran.append(1)) is False and ran == []
    from_pretrained("gpt2-tiny")
    assert _gets(server)[DATA_FILE] == 1


def test_a_group_without_local_rank_finds_it_by_host(hub_env, server, tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.local_rank() == 0 and distributed.preparer()
        ran = []
        assert distributed.prepare_once(lambda: ran.append(1)) is True and ran == [1]
        from_pretrained("gpt2-tiny")
        with pytest.raises(ValueError, match="boom"):  # the preparing rank raises its own error
            distributed.prepare_once(lambda: (_ for _ in ()).throw(ValueError("boom")))
    finally:
        dist.destroy_process_group()
    assert _gets(server)[DATA_FILE] == 1


def test_a_group_without_a_cpu_backend_coordinates_on_a_gloo_group_made_once(hub_env, tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    made = []
    new_group = dist.new_group
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")  # as with init_process_group("nccl")
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or new_group(**kw))
    try:
        ran = []
        for _ in range(2):
            assert distributed.prepare_once(lambda: ran.append(1)) is True
        assert ran == [1, 1] and made == [{"backend": "gloo"}]
    finally:
        dist.destroy_process_group()


def _ranks_by_hand(out: Path, cache: Path, local_ranks: list[str]) -> list[subprocess.CompletedProcess]:
    """A job started without torchrun, each rank given its own LOCAL_RANK (as a hand-written launcher might)."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(out, cache, RANK=str(r), WORLD_SIZE=str(len(local_ranks)), LOCAL_RANK=local,
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r, local in enumerate(local_ranks)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=60)
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs, strict=True)]


def test_ranks_none_of_which_has_local_rank_0_agree_on_a_preparer(hub_env, server, tmp_path):
    server.served.fault(f"/tiny/{DATA_FILE}", Fault("slow", delay=0.01))
    runs = _ranks_by_hand(tmp_path, hub_env, ["1", "1"])  # was: nobody prepared, and no rank could load
    _check_all_ok(runs, _outcomes(tmp_path, 2, runs))
    assert _gets(server) == dict.fromkeys(OPENAI_FILES, 1)
    assert "no rank on" in runs[0].stderr and "rank 0 prepares" in runs[0].stderr and "no rank on" not in runs[1].stderr


def test_a_local_rank_that_is_not_a_number_is_a_one_line_error_on_every_rank(hub_env, server, tmp_path):
    runs = _ranks_by_hand(tmp_path, hub_env, ["0", "abc"])  # was `invalid literal for int()` on rank 1, rank 0 hung
    assert all(r.returncode == 0 for r in runs), [r.stderr[-3000:] for r in runs]
    first, second = _outcomes(tmp_path, 2, runs)
    assert first == ("error SettingError rank 1's LOCAL_RANK is not a whole number >= 0, so no rank loads the model: "
                     "unset it, or set it to each process's rank on its node (torchrun does)")
    assert second.startswith("error SettingError LOCAL_RANK='abc' is not a whole number >= 0") and "\n" not in second
    assert _gets(server) == dict.fromkeys(OPENAI_FILES, 0)


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "9" * 5000])
def test_local_rank_refuses_a_bad_value_naming_it(monkeypatch, value):
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(SettingError, match="LOCAL_RANK=") as err:
        distributed.local_rank()
    assert len(str(err.value)) < 200
