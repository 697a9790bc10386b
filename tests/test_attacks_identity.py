"""Attacks on the rebuilt load path (issue 18, "the cache knows what it holds"): a hostile or careless user, links at
every position, names read from disk, revisions, crashes, races, a read-only or full cache, exports and mirrors.

Each test asserts the safe outcome: the right model, or a one-line typed gpt2hub error naming the thing; nothing
outside the cache deleted, modified or followed; the user's own files never deleted; no hang. The attacks that broke
the code were fixed (see `git log`); those that found nothing stay as cheap regression tests.
"""

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY
from server import COMMIT, Fault
from test_attacks import VICTIM, _bounded, _intact, _logits, _typed
from test_identity import _cli

import gpt2hub
import gpt2hub.export
from gpt2hub import from_pretrained
from gpt2hub.errors import GPT2HubError, NotACacheError
from gpt2hub.mirror import write_mirror
from gpt2hub.registry import OPENAI_FILES

DATA = "model.ckpt.data-00000-of-00001"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"
WORKER = str(Path(__file__).parent / "worker.py")
REPO = f"models--{TINY.hf_repo.replace('/', '--')}"


# helpers ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def victim(tmp_path):
    """The user's own file, in a folder of theirs outside the cache."""
    (tmp_path / "outside").mkdir()
    path = tmp_path / "outside" / "precious.bin"
    path.write_bytes(VICTIM)
    return path


@pytest.fixture
def reference(tiny_folder):
    return _logits(from_pretrained(tiny_folder[0]))


@pytest.fixture
def hf_cache(monkeypatch, hub_env):
    """Hugging Face's cache for this test (huggingface_hub reads HF_HUB_CACHE once, at import)."""
    root = hub_env.parent / "hf_home" / "hub"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    return root


def _tree(root: Path) -> dict:
    """Every path under `root` with its bytes (links and folders as such)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = ("link", os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else \
            p.read_bytes() if p.is_file() else "other"
    return out


# links at every position ---------------------------------------------------------------------------------------------
def test_a_link_planted_at_this_processs_own_partial_name_is_not_written_through(hub_env, server, victim, reference):
    """A hostile user of a shared cache plants `{file}.{pid}.incomplete` links for every pid: the download must not
    write (or truncate) the file the link points to."""
    raw = hub_env / "openai/tiny/raw"
    raw.mkdir(parents=True)
    for name in (DATA, "hparams.json"):
        (raw / f"{name}.{os.getpid()}.incomplete").symlink_to(victim)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert _intact([victim])
    assert "value" in out, out.get("error")
    assert torch.equal(out["value"], reference)
    assert not any(p.is_symlink() for p in raw.iterdir())
@pytest.mark.parametrize("where", ["hf", "hf/tiny"])
def test_a_linked_hf_folder_holding_an_earlier_gpt2hubs_records_is_not_moved(hub_env, server, hf_cache, victim,
                                                                          where):
    """An earlier gpt2hub's Hugging Face records (no commit level) in a folder the cache links to: nothing there may
    be moved or rewritten."""
    from_pretrained("gpt2-tiny", source="hf")
    entry, outside = hub_env / "hf/tiny" / COMMIT, victim.parent
    legacy = outside / "tiny" if where == "hf" else outside
    legacy.mkdir(parents=True, exist_ok=True)
    shutil.copy(entry / "files.json", legacy / "files.json")  # records of revision main, paths in its snapshot
    shutil.rmtree(hub_env / "hf")
    (hub_env / "hf").mkdir()
    if where == "hf":
        (hub_env / "hf").rmdir()
    (hub_env / where).symlink_to(outside if where == "hf" else legacy)
    before = _tree(outside)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny", source="hf")))
    assert _tree(outside) == before
    if "error" in out:
        _typed(out["error"])


@pytest.fixture
def linked_hf_cache(monkeypatch, hub_env, tmp_path):
    """Hugging Face's cache reached through a link, as on machines whose home links to a data disk
    (~/.cache/huggingface -> /data/hf): HF_HUB_CACHE is the link."""
    real = tmp_path / "data" / "hub"
    real.mkdir(parents=True)
    (tmp_path / "home-hub").symlink_to(real)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "home-hub"))
    return real


def test_rm_include_hf_frees_the_blobs_when_the_hf_cache_is_reached_through_a_link(hub_env, server, linked_hf_cache,
                                                                                   capsys):
    from_pretrained("gpt2-tiny", source="hf")
    blobs = linked_hf_cache / REPO / "blobs"
    assert any(blobs.iterdir())
    code, out, err = _cli(capsys, "cache", "rm", "gpt2-tiny", "--include-hf", "-y")
    assert code == 0, err
    assert list(blobs.iterdir()) == [], out  # every blob was this commit's only: freed, as the plan said


def test_a_refused_hf_file_is_fetched_afresh_when_the_hf_cache_is_reached_through_a_link(hub_env, server,
                                                                                        linked_hf_cache):
    """The gate refuses a damaged model.safetensors and says it was deleted: the next load must download it again,
    not get the same bad blob back from Hugging Face's cache."""
    _corrupted_once_in_transit(server)
    with pytest.raises(gpt2hub.IntegrityError, match="model.safetensors.*deleted"):
        from_pretrained("gpt2-tiny", source="hf")
    from_pretrained("gpt2-tiny", source="hf")


def _corrupted_once_in_transit(server) -> None:
    """model.safetensors arrives damaged (its header's first byte flipped: refused by the format's check) under its
    true ETag, as a flaky proxy would hand it over: Hugging Face's cache keeps it as the blob of that ETag."""
    server.served.fault(f"/hf/{TINY.hf_repo}/model.safetensors", Fault("corrupt"))


# folders, FIFOs and links where gpt2hub keeps a file -----------------------------------------------------------------
def test_a_folder_where_an_older_float32_copy_was_kept_is_a_typed_error_or_loads(hub_env, server, reference):
    """converted/float32.safetensors (a copy an older gpt2hub wrote, removed when float32 is mapped) is a folder."""
    (hub_env / "openai/tiny/converted/float32.safetensors").mkdir(parents=True)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    if "error" in out:
        _typed(out["error"], "float32.safetensors")
    else:
        assert torch.equal(out["value"], reference)
@pytest.mark.parametrize("kind", ["fifo", "folder", "binary"])
def test_mirror_into_a_folder_whose_sums_file_is_a_fifo_a_folder_or_junk(hub_env, server, tmp_path, kind):
    gpt2hub.download_files("gpt2-tiny")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    sums = mirror / "SHA256SUMS"
    os.mkfifo(sums) if kind == "fifo" else sums.mkdir() if kind == "folder" else sums.write_bytes(b"\xff\xfe\x00junk")
    out = _bounded(lambda: write_mirror(mirror), 20)
    if "error" in out:
        _typed(out["error"], "SHA256SUMS")
    else:
        assert (mirror / "SHA256SUMS").is_file()


# exports and mirrors into the cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("into", ["", "openai/tiny/raw", "openai", "link/openai/tiny/raw"])
@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_export_into_the_cache_is_refused_even_with_overwrite(hub_env, server, tmp_path, into, fmt):
    """`gpt2hub export gpt2-tiny $GPT2HUB_CACHE/... --overwrite` (a slip of the tab key): the cache's own files must
    not be replaced by an export's (raw/encoder.json and vocab.bpe are names the safetensors export owns)."""
    gpt2hub.download_files("gpt2-tiny")
    (tmp_path / "link").symlink_to(hub_env)  # the cache reached through a link of the user's
    before = _tree(hub_env)
    folder = tmp_path / into if into.startswith("link") else hub_env / into
    with pytest.raises(ValueError, match="gpt2hub cache") as e:
        gpt2hub.export.export_model("gpt2-tiny", folder, format=fmt, overwrite=True)
    assert "\n" not in str(e.value) and str(hub_env) in str(e.value)
    assert {k: v for k, v in _tree(hub_env).items() if not k.startswith("locks")} == \
        {k: v for k, v in before.items() if not k.startswith("locks")}


@pytest.mark.parametrize("into", ["", "openai"])
def test_mirror_into_the_cache_is_refused(hub_env, server, into):
    gpt2hub.download_files("gpt2-tiny")
    before = _tree(hub_env)
    with pytest.raises(GPT2HubError, match="gpt2hub cache") as e:
        write_mirror(hub_env / into)
    assert "\n" not in str(e.value)
    assert _tree(hub_env) == before


# races -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_rm_between_a_loads_check_and_its_read(hub_env, server, monkeypatch, reference, dtype):
    """`gpt2hub cache rm` in another shell removes the files after a warm load checked them (under no lock) and
    before it reads them: the load gets the right model (fetched again) or a typed error, never FileNotFoundError."""
    from gpt2hub.hub import Hub
    from gpt2hub.inventory import plan_removal, remove

    from_pretrained("gpt2-tiny", dtype=dtype)
    checked = Hub.weights
    removed = []

    def check_then_rm(self, store, force=False):
        weights = checked(self, store, force)
        if not removed:
            removed.append(remove(plan_removal(hub_env, "gpt2-tiny")))
        return weights

    monkeypatch.setattr(Hub, "weights", check_then_rm)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny", dtype=dtype)))
    assert removed and removed[0].bytes > 0
    if "error" in out:
        _typed(out["error"])
    else:
        expected = reference if dtype == "float32" else _logits(from_pretrained("gpt2-tiny").to(torch.bfloat16))
        assert torch.equal(out["value"], expected)


# an earlier gpt2hub's cache, crashes ---------------------------------------------------------------------------------
def _as_an_earlier_gpt2hub_left_it(cache: Path) -> None:
    """The Hub's records and converted weights at hf/tiny/ (no commit level, no refs.json), no marker."""
    entry, folder = cache / "hf/tiny" / COMMIT, cache / "hf/tiny"
    os.replace(entry / "files.json", folder / "files.json")
    os.replace(entry / "converted", folder / "converted")
    entry.rmdir()
    for name in ("refs.json", "../../CACHEDIR.TAG", "../../gpt2hub-cache.json"):
        (folder / name).unlink()


@pytest.mark.parametrize("crash", [0, 1, 2, 3], ids=["no crash", "at the first move", "at the second move",
                                                  "before the revision is remembered"])
def test_moving_an_earlier_gpt2hubs_hub_records_survives_a_crash_at_every_step(hub_env, server, hf_cache, monkeypatch,
                                                                               crash):
    """The move into the commit's entry is killed at each of its renames: the next load (offline) uses what the earlier
    gpt2hub prepared and leaves nothing behind that no command lists or removes."""
    first = _logits(from_pretrained("gpt2-tiny", source="hf", dtype="bfloat16"))
    _as_an_earlier_gpt2hub_left_it(hub_env)
    folder, rename, renames = hub_env / "hf/tiny", os.replace, []

    def killed(src, dst, **kw):  # a rename into the entry, or of refs.json: the crash_th one never happens
        if Path(dst).parent.parent == folder or Path(dst) == folder / "refs.json":
            renames.append(dst)
            if len(renames) == crash:
                raise KeyboardInterrupt  # (as kill -9: nothing after it runs; the lock goes with the process)
        return rename(src, dst, **kw)

    monkeypatch.setattr(os, "replace", killed)
    server.close()
    monkeypatch.setenv("GPT2HUB_OFFLINE", "1")
    if crash:
        with pytest.raises(KeyboardInterrupt):
            from_pretrained("gpt2-tiny", source="hf", dtype="bfloat16")
    monkeypatch.setattr(os, "replace", rename)
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf", dtype="bfloat16")), first)
    assert sorted(p.name for p in folder.iterdir()) == sorted([COMMIT, "refs.json"])  # nothing left behind, unlisted
    assert sorted(p.name for p in (folder / COMMIT / "converted").iterdir()) == ["bfloat16.json", "bfloat16.safetensors"]


def test_an_earlier_gpt2hubs_hub_records_are_not_moved_into_a_linked_commit_folder(hub_env, server, hf_cache, victim):
    first = _logits(from_pretrained("gpt2-tiny", source="hf", dtype="bfloat16"))
    _as_an_earlier_gpt2hub_left_it(hub_env)
    (hub_env / "hf/tiny" / COMMIT).symlink_to(victim.parent)
    before = _tree(victim.parent)
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf", dtype="bfloat16")), first)
    assert _tree(victim.parent) == before
@pytest.mark.parametrize("damage", [{"revision": ["main"]}, {"revision": {"main": 1}}, {"path": 7}, {"revision": None},
                                    {"path": f"/etc/{COMMIT}/config.json"}])
def test_an_earlier_gpt2hubs_damaged_hub_records_are_not_trusted(hub_env, server, hf_cache, damage):
    first = _logits(from_pretrained("gpt2-tiny", source="hf"))
    _as_an_earlier_gpt2hub_left_it(hub_env)
    files = hub_env / "hf/tiny/files.json"
    records = json.loads(files.read_text())
    records["config.json"] = {**records["config.json"], **damage}
    files.chmod(0o644)
    files.write_text(json.dumps(records))
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny", source="hf")))
    assert "value" in out, out.get("error")
    assert torch.equal(out["value"], first)


# what makes a folder a cache -----------------------------------------------------------------------------------------
@pytest.fixture
def projects(tmp_path):
    """A user's folder holding only folders named openai/, hf/ and locks/ of their own (API experiments, datasets)."""
    folder = tmp_path / "projects"
    for name in ("openai/whisper-experiments/notes.md", "hf/datasets/train.jsonl", "locks/door.txt"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(VICTIM)
    return folder


def test_a_load_does_not_take_over_a_folder_whose_openai_and_hf_folders_hold_the_users_files(hub_env, server, projects,
                                                                                         capsys):
    """Marking it would make backup tools skip the user's files (CACHEDIR.TAG), and `cache rm` act there."""
    before = _tree(projects)
    code, _, err = _cli(capsys, "cache", "list", "--cache-dir", str(projects))
    assert code == 1 and "not a gpt2hub cache" in err  # refused by the commands: loads must agree
    with pytest.raises(NotACacheError, match="not a gpt2hub cache"):
        from_pretrained("gpt2-tiny", cache_dir=projects)
    assert _tree(projects) == before and server.served.log == []


def test_a_new_folder_with_only_gpt2hubs_empty_folders_still_becomes_a_cache(hub_env, server, reference):
    for name in ("openai/tiny/raw", "hf", "locks"):
        (hub_env / name).mkdir(parents=True)
    (hub_env / "locks/openai--tiny.lock").write_bytes(b"")
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)
    assert (hub_env / "CACHEDIR.TAG").is_file()


@pytest.mark.parametrize("marker", ["CACHEDIR.TAG", "gpt2hub-cache.json"])
@pytest.mark.parametrize("kind", ["fifo", "folder", "link", "dangling link"])
def test_a_marker_that_is_not_a_regular_file_never_hangs_or_escapes(hub_env, server, victim, reference, capsys, marker,
                                                                  kind):
    from_pretrained("gpt2-tiny")
    path = hub_env / marker
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(victim if kind == "link" else victim.parent / "gone")
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")), 20)
    if "error" in out:
        _typed(out["error"], marker)
    else:
        assert torch.equal(out["value"], reference)
    out = _bounded(lambda: _cli(capsys, "cache", "list"), 20)
    assert "value" in out and "Traceback" not in out["value"][2]
    assert _intact([victim]) and sorted(p.name for p in victim.parent.iterdir()) == ["precious.bin"]


def test_a_cache_of_a_newer_gpt2hub_is_refused_by_loads_and_commands_and_left_alone(hub_env, server, capsys):
    from_pretrained("gpt2-tiny")
    version = hub_env / "gpt2hub-cache.json"
    version.chmod(0o644)
    version.write_text(json.dumps({"gpt2hub_cache": 99}))
    before = _tree(hub_env)
    with pytest.raises(NotACacheError, match="newer gpt2hub: upgrade"):
        from_pretrained("gpt2-tiny")
    for argv in (["cache", "rm", "--all", "-y"], ["cache", "prune"], ["cache", "verify", "--repair"], ["cache", "list"]):
        code, _, err = _cli(capsys, *argv)
        assert code == 1 and "newer gpt2hub" in err and err.count("\n") == 1, (argv, err)
    assert _tree(hub_env) == before


def test_a_kill_while_marking_a_new_cache_leaves_one_that_commands_still_recognise(hub_env, server, capsys):
    """kill -9 between writing CACHEDIR.TAG and the version file (its temporary file left behind)."""
    hub_env.mkdir()
    (hub_env / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    (hub_env / ".gpt2hub-cache.json.k3x9q2ab.tmp").write_text('{"gpt2hub_ca')
    for argv in (["cache", "list"], ["cache", "prune"], ["cache", "verify"]):
        code, out, err = _cli(capsys, *argv)
        assert code == 0, (argv, err)
    gpt2hub.download_files("gpt2-tiny")
    assert json.loads((hub_env / "gpt2hub-cache.json").read_text())["gpt2hub_cache"] == 3


# revisions and refs.json ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("refs", [b"not json", b"[1, 2]", b'{"main": "../../../outside"}', b'{"main": 7}',
                                  b'{"main": "' + COMMIT.upper().encode() + b'"}', b"", "fifo", "folder", "link"])
def test_a_damaged_refs_json_is_asked_of_the_hub_again(hub_env, server, hf_cache, victim, refs):
    first = _logits(from_pretrained("gpt2-tiny", source="hf"))
    path = hub_env / "hf/tiny/refs.json"
    path.unlink()
    if refs == "fifo":
        os.mkfifo(path)
    elif refs == "folder":
        path.mkdir()
    elif refs == "link":
        victim.write_text(json.dumps({"main": COMMIT2}))  # a link to another cache's refs, say
        path.symlink_to(victim)
    else:
        path.write_bytes(refs)
    text = victim.read_bytes()
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny", source="hf")), 20)
    if "error" in out:
        _typed(out["error"], "refs.json")
    else:
        assert torch.equal(out["value"], first)
    assert victim.read_bytes() == text


def test_refs_naming_a_commit_whose_folder_is_a_link_write_nothing_through_it(hub_env, server, hf_cache, victim):
    first = _logits(from_pretrained("gpt2-tiny", source="hf", dtype="bfloat16"))
    entry = hub_env / "hf/tiny" / COMMIT
    shutil.copytree(entry, victim.parent / "entry")
    shutil.rmtree(entry)
    entry.symlink_to(victim.parent / "entry")
    before = _tree(victim.parent)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny", source="hf", dtype="bfloat16")))
    assert _tree(victim.parent) == before
    assert "value" in out, out.get("error")
    assert torch.equal(out["value"], first) and not entry.is_symlink()


@pytest.fixture
def v1(server, tmp_path):
    """A second commit on the stand-in Hub (other weights), reachable as tag v1 and as refs/pr/1."""
    from conftest import TINY_HP

    from gpt2hub.synthetic import placeholder_vocab, random_weights, write_hf_folder

    folder = tmp_path / "v1"
    write_hf_folder(folder, TINY_HP, random_weights(TINY_HP, seed=7), placeholder_vocab())
    for f in folder.iterdir():
        server.served.files[f"/hf/{COMMIT2}/{TINY.hf_repo}/{f.name}"] = f.read_bytes()
    server.served.revisions.update({"v1": COMMIT2, "refs/pr/1": COMMIT2})
    return server


def test_a_pull_request_revision_is_its_commits_entry(hub_env, v1, hf_cache):
    pr = _logits(from_pretrained("gpt2-tiny", source="hf", revision="refs/pr/1"))
    assert torch.equal(pr, _logits(from_pretrained("gpt2-tiny", source="hf", revision="v1")))
    assert not torch.equal(pr, _logits(from_pretrained("gpt2-tiny", source="hf")))
    assert json.loads((hub_env / "hf/tiny/refs.json").read_text())["refs/pr/1"] == COMMIT2


def test_a_commit_hash_the_hub_does_not_know_is_a_typed_error_that_leaves_no_entry(hub_env, server, hf_cache, capsys):
    unknown = "ab" * 20
    with pytest.raises(gpt2hub.DownloadError, match=f"revision '{unknown}' does not exist") as e:
        from_pretrained("gpt2-tiny", source="hf", revision=unknown)
    assert "\n" not in str(e.value)
    code, out, _ = _cli(capsys, "cache", "list")
    assert code == 0 and unknown[:8] not in out
    assert not (hub_env / "hf/tiny" / unknown / "files.json").exists()


def test_when_main_moves_a_warm_cache_keeps_the_commit_it_resolved(hub_env, v1, hf_cache):
    """Documented: a branch is resolved once and remembered (no request on a warm load)."""
    first = _logits(from_pretrained("gpt2-tiny", source="hf"))
    v1.served.revisions["main"] = COMMIT2
    n = len(v1.served.log)
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf")), first) and len(v1.served.log) == n


# a read-only cache ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _read_only(folder: Path):
    """`folder` bind-mounted read-only onto itself for the block (root ignores permission bits)."""
    proc = subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot bind-mount read-only here: {proc.stderr.decode()[:100]}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_cache_loads_a_cached_commit_by_a_tag_it_has_not_seen(hub_env, v1, hf_cache):
    first = _logits(from_pretrained("gpt2-tiny", source="hf"))
    v1.served.revisions["stable"] = COMMIT  # another name of the cached commit
    with _read_only(hub_env):
        out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny", source="hf", revision="stable")))
        with pytest.raises(gpt2hub.CacheError, match="GPT2HUB_CACHE") as e:  # a commit it does not hold: named
            from_pretrained("gpt2-tiny", source="hf", revision="v1")
    assert "value" in out, out.get("error")
    assert torch.equal(out["value"], first) and str(hub_env) in str(e.value)


def test_a_read_only_cache_of_an_earlier_gpt2hub_loads_and_lists(hub_env, server, hf_cache, reference, capsys):
    from_pretrained("gpt2-tiny")
    for marker in ("CACHEDIR.TAG", "gpt2hub-cache.json"):
        (hub_env / marker).unlink()
    with _read_only(hub_env):
        assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)
        code, out, err = _cli(capsys, "cache", "list")
        assert code == 0 and "gpt2-tiny" in out, err
        code, out, err = _cli(capsys, "cache", "verify")
        assert code == 0, (out, err)
        code, _, err = _cli(capsys, "cache", "prune")
        assert code in (0, 1) and err.count("\n") <= 1 and "Traceback" not in err


# races with another process ------------------------------------------------------------------------------------------
def _downloading(hub_env, server):
    """A worker process downloading the tiny model slowly; returned once its data file's partial holds bytes."""
    from test_attacks import _partial, _wait_for, _worker

    server.served.fault(f"/tiny/{DATA}", Fault("slow", delay=0.05))
    proc = _worker("download")
    _wait_for(lambda: _partial(hub_env / "openai/tiny/raw", DATA), proc)
    return proc


def test_prune_while_a_download_runs_leaves_its_partial_file(hub_env, server, capsys):
    proc = _downloading(hub_env, server)
    try:
        code, out, err = _cli(capsys, "cache", "prune")
        assert code == 0 and "skipped" in out and "another process holds" in out, (out, err)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-500:]
    finally:
        proc.kill()
    assert sorted(json.loads((hub_env / "openai/tiny/files.json").read_text())) == sorted(OPENAI_FILES)


def test_cache_rm_while_a_download_runs_waits_then_gives_up_in_one_line(hub_env, server, capsys):
    proc = _downloading(hub_env, server)
    try:
        code, _, err = _cli(capsys, "cache", "rm", "gpt2-tiny", "-y", "--timeout", "1")
        last = err.strip().splitlines()[-1]  # (after the line saying who it waits for)
        assert code == 1 and last.startswith("gpt2hub: error: gave up") and "pid" in last, err
        assert "wait longer than 1 s (`gpt2hub cache rm --timeout`)" in last and "GPT2HUB_LOCK_TIMEOUT" not in last
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-500:]
    finally:
        proc.kill()
    assert _cli(capsys, "cache", "rm", "gpt2-tiny", "-y")[0] == 0
    assert not (hub_env / "openai/tiny").exists()


# cache verify --repair on hostile entries -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["link", "fifo", "folder"])
def test_verify_repair_replaces_a_link_or_fifo_where_a_published_file_belongs(hub_env, server, victim, reference, capsys,
                                                                            kind):
    gpt2hub.download_files("gpt2-tiny")
    path = hub_env / "openai/tiny/raw/hparams.json"
    path.unlink()
    path.symlink_to(victim) if kind == "link" else os.mkfifo(path) if kind == "fifo" else path.mkdir()
    out = _bounded(lambda: _cli(capsys, "cache", "verify", "--repair"), 30)
    code, stdout, err = out["value"]
    assert _intact([victim])
    if kind == "folder":  # gpt2hub never removes a folder: it says which and what to do
        last = err.strip().splitlines()[-1]
        assert code == 1 and last.startswith("gpt2hub: error: ") and "hparams.json is a folder" in last, err
        assert "by hand" in last
        return
    assert code == 0 and "repaired" in stdout, (stdout, err)
    assert path.is_file() and not path.is_symlink()
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)


def test_verify_repair_of_a_folder_with_records_of_a_model_not_registered_here(hub_env, server, capsys):
    """openai/zz-mine/ holds gpt2hub's records (a model another process registered): verify lists its problems and
    --repair, which cannot fetch a model it does not know, says so in one line (not "unknown model 'zz-mine'. Valid
    names: ...", which reads as if the user had typed a wrong name)."""
    gpt2hub.download_files("gpt2-tiny")
    shutil.copytree(hub_env / "openai/tiny", hub_env / "openai/zz-mine")
    (hub_env / "openai/zz-mine/raw/vocab.bpe").unlink()
    code, out, err = _cli(capsys, "cache", "verify", "--repair")
    assert code == 1 and err.count("\n") == 1 and "cannot repair" in err and "zz-mine" in err, (out, err)
    assert "is registered" in err and "openai/zz-mine: 1 problem(s)" in out
    assert (hub_env / "openai/zz-mine/raw/encoder.json").is_file()  # nothing of it was removed


# exports and mirrors into folders holding links -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt,owned", [("hf", "model.safetensors"), ("hf", "tokenizer.json"),
                                       ("safetensors", "gpt2hub.safetensors"), ("safetensors", "encoder.json")])
def test_export_overwrite_unlinks_a_link_at_an_owned_name_and_leaves_its_target(hub_env, server, tmp_path, victim, fmt,
                                                                              owned):
    out = tmp_path / "export"
    out.mkdir()
    (out / owned).symlink_to(victim)
    gpt2hub.export.export_model("gpt2-tiny", out, format=fmt, overwrite=True)
    assert _intact([victim]) and not (out / owned).is_symlink()


def test_export_into_a_file_a_dangling_link_or_over_an_owned_folder_is_one_line(hub_env, server, tmp_path, victim):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "owned" / "config.json").mkdir(parents=True)
    for folder, overwrite in ((victim, False), (tmp_path / "dangling", False), (tmp_path / "owned", True)):
        with pytest.raises((ValueError, GPT2HubError)) as e:
            gpt2hub.export.export_model("gpt2-tiny", folder, overwrite=overwrite)
        assert "\n" not in str(e.value) and str(folder) in str(e.value)
    assert _intact([victim]) and (tmp_path / "owned" / "config.json").is_dir()


def test_mirror_replaces_links_in_its_folder_never_writing_through_them(hub_env, server, tmp_path, victim):
    gpt2hub.download_files("gpt2-tiny")
    mirror = tmp_path / "mirror"
    (mirror / TINY.size).mkdir(parents=True)
    for name in (f"{TINY.size}/{DATA}", f"{TINY.size}/hparams.json", "SHA256SUMS"):
        (mirror / name).symlink_to(victim)
    write_mirror(mirror)
    assert _intact([victim]) and not any(p.is_symlink() for p in mirror.rglob("*"))


def test_mirror_into_a_file_is_one_line(hub_env, server, victim):
    gpt2hub.download_files("gpt2-tiny")
    with pytest.raises(GPT2HubError) as e:
        write_mirror(victim)
    assert "\n" not in str(e.value) and str(victim) in str(e.value) and _intact([victim])


# more revision names, crashes, a disk that fills, the cache swapped mid-download -------------------------------------
@pytest.mark.parametrize("revision,fits", [("é" * 127, True), ("é" * 128, False), ("v1%2Fmain", True),
                                           ("refs/heads/main", True)])
def test_long_unicode_and_encoded_revision_names(hub_env, server, hf_cache, revision, fits):
    error = gpt2hub.DownloadError if fits else ValueError  # 254 bytes may be a ref; 256 may not
    with pytest.raises(error) as e:
        from_pretrained("gpt2-tiny", source="hf", revision=revision)
    assert "\n" not in str(e.value) and len(str(e.value)) < 1000
    assert not (hub_env / "hf/tiny/refs.json").exists()


def test_a_kill_between_a_files_rename_and_its_record_needs_no_second_download(hub_env, server, monkeypatch, reference):
    from gpt2hub.cache import Entry

    record = Entry.record

    def killed(self, accepted):
        if accepted.name == DATA:
            raise KeyboardInterrupt  # (as kill -9 after the rename: nothing after it runs)
        return record(self, accepted)

    monkeypatch.setattr(Entry, "record", killed)
    with pytest.raises(KeyboardInterrupt):
        from_pretrained("gpt2-tiny")
    monkeypatch.setattr(Entry, "record", record)
    assert (hub_env / "openai/tiny/raw" / DATA).is_file()
    server.close()  # the file on disk passes its gate again: recorded without the network
    assert torch.equal(_logits(from_pretrained("gpt2-tiny")), reference)


@pytest.mark.parametrize("options", ["size=16k", "nr_inodes=3"], ids=["full", "no inodes"])
def test_a_cache_on_a_full_disk_is_one_typed_line_naming_it(hub_env, server, options):
    hub_env.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(hub_env)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode()[:100]}")
    try:
        out = _bounded(lambda: from_pretrained("gpt2-tiny"))
        assert "error" in out
        _typed(out["error"], str(hub_env), "no space left")
        assert not (hub_env / "openai/tiny/raw" / DATA).exists()
    finally:
        subprocess.run(["umount", str(hub_env)], check=True)


def test_raw_swapped_for_a_link_mid_download_writes_nothing_outside(hub_env, server, victim, reference):
    """Another user of a shared cache replaces raw/ with a link to their own folder while the data file arrives."""
    raw, moved = hub_env / "openai/tiny/raw", hub_env / "openai/tiny/raw-moved"
    (victim.parent / DATA).write_bytes(VICTIM)

    def swap():
        os.rename(raw, moved)
        raw.symlink_to(victim.parent)

    server.served.fault(f"/{TINY.size}/{DATA}", Fault("hook", after=1000, hook=swap))
    before = _tree(victim.parent)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert _tree(victim.parent) == before
    if "error" in out:  # (the partial file vanished with the folder moved away: said so)
        _typed(out["error"], DATA)
    else:
        assert torch.equal(out["value"], reference)


def test_raw_swapped_for_a_link_then_a_broken_connection_writes_nothing_outside(hub_env, server, victim, reference):
    """As above, and the connection then breaks: the retry opened the partial file again by its path, through the
    link, and the finished file replaced the user's file of the same name (seen on a slow CI run, where a read timed
    out after the swap)."""
    raw, moved = hub_env / "openai/tiny/raw", hub_env / "openai/tiny/raw-moved"
    (victim.parent / DATA).write_bytes(VICTIM)

    def swap_and_break():
        os.rename(raw, moved)
        raw.symlink_to(victim.parent)
        raise ConnectionAbortedError("the test breaks the connection after the swap")

    server.served.fault(f"/{TINY.size}/{DATA}", Fault("hook", after=1000, hook=swap_and_break))
    before = _tree(victim.parent)
    out = _bounded(lambda: _logits(from_pretrained("gpt2-tiny")))
    assert _tree(victim.parent) == before
    if "error" in out:
        _typed(out["error"], DATA)
    else:
        assert torch.equal(out["value"], reference)


def test_rm_include_hf_keeps_a_blob_that_a_link_in_a_subfolder_still_needs(hub_env, server, hf_cache, capsys):
    """openai-community/gpt2 also publishes onnx/vocab.json, byte for byte the root's vocab.json: one blob, two links.
    A user who fetched the ONNX files too keeps a working onnx/vocab.json after `cache rm --include-hf`."""
    from_pretrained("gpt2-tiny", source="hf")
    snapshot = hf_cache / REPO / "snapshots" / COMMIT
    (snapshot / "onnx").mkdir()
    (snapshot / "onnx/vocab.json").symlink_to(Path("..") / os.readlink(snapshot / "vocab.json"))
    assert (snapshot / "onnx/vocab.json").read_bytes()
    assert _cli(capsys, "cache", "rm", "gpt2-tiny", "--include-hf", "-y")[0] == 0
    assert (snapshot / "onnx/vocab.json").read_bytes()  # its blob is still there
    assert not (snapshot / "vocab.json").exists()


def test_a_damaged_blob_two_commits_share_is_fetched_afresh_not_handed_back(hub_env, server, hf_cache):
    """Two commits whose model.safetensors is the same bytes (main moved for a README change) share one blob. Bit rot
    in it is found on load: the load must download it again, not take back the damaged blob the other commit's link
    still points to (the format's check passes a flipped weight; only the record's crc32c tells)."""
    for f in list(server.served.files):
        if f.startswith(f"/hf/{TINY.hf_repo}/"):
            server.served.files[f.replace("/hf/", f"/hf/{COMMIT2}/", 1)] = server.served.files[f]
    server.served.revisions["v1"] = COMMIT2
    first = _logits(from_pretrained("gpt2-tiny", source="hf"))
    from_pretrained("gpt2-tiny", source="hf", revision="v1")
    blob = (hf_cache / REPO / "snapshots" / COMMIT / "model.safetensors").resolve()
    assert blob == (hf_cache / REPO / "snapshots" / COMMIT2 / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0x40  # a weight of the last tensor: the header stays valid
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf")), first)


def test_a_refused_hf_file_is_fetched_afresh_when_its_repo_folder_is_a_link(hub_env, server, hf_cache, tmp_path):
    """One repo's folder moved to a bigger disk and linked back (models--org--gpt2-xl -> /data/...)."""
    (tmp_path / "data" / REPO).mkdir(parents=True)
    hf_cache.mkdir(parents=True)
    (hf_cache / REPO).symlink_to(tmp_path / "data" / REPO)
    _corrupted_once_in_transit(server)
    with pytest.raises(gpt2hub.IntegrityError, match="model.safetensors.*deleted"):
        from_pretrained("gpt2-tiny", source="hf")
    from_pretrained("gpt2-tiny", source="hf")
    assert (hf_cache / REPO).is_symlink()  # Hugging Face's cache is the user's: left as they made it


def test_a_read_only_cache_of_an_earlier_gpt2hubs_hub_records_is_one_typed_line(hub_env, server, hf_cache):
    """Not fixed (reported): its records cannot be moved into their commit's entry on a read-only disk, so the Hub's
    model is not loaded from it; the error says where and what to do."""
    from_pretrained("gpt2-tiny", source="hf")
    _as_an_earlier_gpt2hub_left_it(hub_env)
    with _read_only(hub_env):
        out = _bounded(lambda: from_pretrained("gpt2-tiny", source="hf"))
    if "error" in out:
        _typed(out["error"], str(hub_env), "GPT2HUB_CACHE")


@pytest.mark.parametrize("link", [False, True], ids=["copies", "--link"])
def test_mirror_whose_size_folder_links_into_the_cache_leaves_the_cache_alone(hub_env, server, tmp_path, link):
    gpt2hub.download_files("gpt2-tiny")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / TINY.size).symlink_to(hub_env / "openai/tiny/raw")  # "the mirror serves the cache's files as they are"
    before = {p.name: (p.stat().st_ino, p.stat().st_mode, p.stat().st_mtime_ns) for p in (hub_env / "openai/tiny/raw").iterdir()}
    out = _bounded(lambda: write_mirror(mirror, link=link))
    after = {p.name: (p.stat().st_ino, p.stat().st_mode, p.stat().st_mtime_ns) for p in (hub_env / "openai/tiny/raw").iterdir()}
    assert after == before
    if "error" in out:
        _typed(out["error"], "gpt2hub cache")


def test_a_refused_hf_file_whose_blobs_folder_is_a_link(hub_env, server, hf_cache, tmp_path):
    """blobs/ moved to another disk and linked back: a blob is deleted only inside the repo's own blobs/ folder, so the
    damaged one stays; the error must not claim it was deleted (a second run would get it back)."""
    (tmp_path / "data" / "blobs").mkdir(parents=True)
    (hf_cache / REPO).mkdir(parents=True)
    (hf_cache / REPO / "blobs").symlink_to(tmp_path / "data" / "blobs")
    _corrupted_once_in_transit(server)
    with pytest.raises(gpt2hub.IntegrityError) as e:
        from_pretrained("gpt2-tiny", source="hf")
    _typed(e.value, "model.safetensors")
    out = _bounded(lambda: from_pretrained("gpt2-tiny", source="hf"))
    if "error" in out:  # the damaged blob is still there: the first error said so, and what to do
        assert "deleted" not in str(e.value) and "by hand" in str(e.value)


def test_verify_on_a_read_only_cache_still_reports_what_is_damaged(hub_env, server, capsys):
    gpt2hub.download_files("gpt2-tiny")
    vocab = hub_env / "openai/tiny/raw/vocab.bpe"
    vocab.chmod(0o644)
    vocab.write_bytes(vocab.read_bytes()[:-1] + b"!")
    with _read_only(hub_env):
        code, out, err = _cli(capsys, "cache", "verify")
    assert code == 1 and "vocab.bpe" in out and "damaged" in out, (out, err)


@pytest.mark.parametrize("kind", ["LFS blob (sha256 name)", "git blob (git blob id name)"])
def test_a_blob_changed_in_hugging_faces_cache_is_refused_not_adopted(hub_env, server, hf_cache, reference, kind,
                                                                      capsys):
    """Bytes Hugging Face's cache hands over are checked against their blob's name (sha256 for LFS files, the git
    blob id for others) before gpt2hub adopts them: an edit in place after the download is refused, that blob
    deleted, and the next run downloads it afresh."""
    import hashlib

    name = "model.safetensors" if kind.startswith("LFS") else "config.json"
    path = f"/hf/{TINY.hf_repo}/{name}"
    if not kind.startswith("LFS"):  # serve it as the Hub serves files kept in git: named by their git blob id
        body = server.served.files[path]
        git_id = hashlib.sha1(f"blob {len(body)}\0".encode() + body).hexdigest()
        server.served.git_ids[path] = git_id
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf")), reference)
    assert _cli(capsys, "cache", "rm", "gpt2-tiny", "--source", "hf", "-y")[0] == 0  # HF's blobs stay
    blob = next(p for p in (hf_cache / REPO / "snapshots").rglob(name)).resolve()
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))  # an edit in place: same size, the blob's name no longer its hash
    with pytest.raises(gpt2hub.IntegrityError, match=f"{name}.*does not hash to the name of its blob.*deleted"):
        from_pretrained("gpt2-tiny", source="hf")
    assert not blob.exists()
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf")), reference)
