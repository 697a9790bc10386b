"""The cache knows what it holds: a folder that is not a cache, a revision, a mirror and an export each have an identity.

Each scenario is one a hostile or careless user met on an earlier gpt2hub: cache commands pointed at a home folder
deleted its files; a revision answered for another (and bypassed a pin); editing a mirror changed the cache; an export
mixed another model's tokenizer into its folder; `cache verify` described a repair that never happened.
"""

import hashlib
import json
import os
import stat

import pytest
import torch
from conftest import TINY, TINY_HP
from server import COMMIT

import gpt2hub
from gpt2hub import DownloadError, IntegrityError, NotACacheError, OfflineError, from_pretrained
from gpt2hub.cli import main
from gpt2hub.synthetic import placeholder_vocab, random_weights, write_hf_folder
from gpt2hub.tf_checkpoint import read_index

DATA = "model.ckpt.data-00000-of-00001"
COMMIT2 = "fedcba9876543210fedcba9876543210fedcba98"


def _snapshot(root) -> dict:
    """Every path under `root` with its content's sha256 and mode (folders and links as such)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        kind = "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else \
            hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(root))] = kind
    return out


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(12)[None])


def _cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# 1. a folder that is not a cache ------------------------------------------------------------------------------------
USER_FILES = {"openai/whisper-experiments/notes.md": b"my notes\n", "openai/whisper-experiments/results.csv": b"a,b\n",
              "hf/datasets/train.jsonl": b'{"text": "hi"}\n', ".draft.tmp": b"draft", "talk.mp4.incomplete": b"mp4",
              "locks/keep.lock": b"", "notes.md": b"# home\n"}


@pytest.fixture
def home(tmp_path):
    """A user's home folder with its own openai/ and hf/ folders, partial files and a lock file."""
    folder = tmp_path / "home"
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("argv", [["cache", "rm", "--all", "-y"], ["cache", "prune"], ["cache", "list"],
                                  ["cache", "rm", "gpt2-tiny", "-y"], ["cache", "verify"], ["cache", "verify", "--repair"],
                                  ["cache", "list", "--json"], ["mirror", "MIRROR"]])
@pytest.mark.parametrize("how", ["GPT2HUB_CACHE", "--cache-dir"])
def test_cache_commands_refuse_a_folder_that_is_not_a_cache_and_touch_nothing(home, server, capsys, monkeypatch,
                                                                              tmp_path, argv, how):
    argv = [str(tmp_path / "mirror") if a == "MIRROR" else a for a in argv]
    if how == "GPT2HUB_CACHE":
        monkeypatch.setenv("GPT2HUB_CACHE", str(home))
    else:
        argv += ["--cache-dir", str(home)]
    before = _snapshot(home)
    code, out, err = _cli(capsys, *argv)
    assert code == 1 and err.startswith("gpt2hub: error: not ") and err.count("\n") == 1, (out, err)
    assert str(home) in err and "not a gpt2hub cache" in err and "nothing in it was touched" in err
    assert _snapshot(home) == before and not (tmp_path / "mirror").exists()


def test_cache_rm_takes_registered_names_only_with_a_suggestion(home, capsys, monkeypatch):
    monkeypatch.setenv("GPT2HUB_CACHE", str(home))
    before = _snapshot(home)
    code, _, err = _cli(capsys, "cache", "rm", "whisper-experiments", "-y")
    assert code != 0 and "unknown model 'whisper-experiments'" in err and _snapshot(home) == before
    code, _, err = _cli(capsys, "cache", "rm", "gpt2-tinny", "-y")
    assert code != 0 and "Did you mean 'gpt2-tiny'?" in err and _snapshot(home) == before


def test_loading_into_a_folder_that_is_not_a_cache_is_refused_before_any_request(home, server, monkeypatch):
    monkeypatch.setenv("GPT2HUB_OPENAI_URL", server.url)
    before = _snapshot(home)
    with pytest.raises(NotACacheError, match="not a gpt2hub cache"):
        from_pretrained("gpt2-tiny", cache_dir=home)
    assert _snapshot(home) == before and server.served.log == []


def test_a_new_or_empty_folder_becomes_a_cache_with_its_marker(hub_env, server, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for root in (hub_env, empty):  # hub_env does not exist yet
        gpt2hub.download_files("gpt2-tiny", cache_dir=root)
        assert (root / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
        assert json.loads((root / "gpt2hub-cache.json").read_text())["gpt2hub_cache"] == 3


def test_the_users_files_inside_a_cache_survive_prune_and_rm_all(hub_env, server, capsys):
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    planted = {"openai/whisper-experiments/notes.md": b"notes", "openai/tiny/raw/.draft.tmp": b"draft",
               "openai/tiny/raw/talk.mp4.incomplete": b"mp4", "openai/tiny/notes.md": b"mine", "locks/keep.lock": b"",
               "openai/tiny/converted/my.json": b"{}", "hf/datasets/train.jsonl": b"{}"}
    for name, data in planted.items():
        (hub_env / name).parent.mkdir(parents=True, exist_ok=True)
        (hub_env / name).write_bytes(data)
    assert _cli(capsys, "cache", "prune")[0] == 0
    assert _cli(capsys, "cache", "rm", "--all", "-y")[0] == 0
    assert all((hub_env / n).read_bytes() == d for n, d in planted.items())
    assert not (hub_env / "openai/tiny/raw" / DATA).exists() and not (hub_env / "openai/tiny/files.json").exists()
    code, out, _ = _cli(capsys, "cache", "list")
    assert code == 0 and "whisper-experiments" not in out and "datasets" not in out


def test_a_cache_of_an_earlier_gpt2hub_is_used_as_it_is_and_marked(hub_env, server, capsys):
    first = _logits(from_pretrained("gpt2-tiny", dtype="bfloat16"))
    for marker in ("CACHEDIR.TAG", "gpt2hub-cache.json"):  # as an earlier gpt2hub left it: records, no marker
        (hub_env / marker).unlink()
    code, out, _ = _cli(capsys, "cache", "list")  # recognised by its records: listed, not refused, and marked
    assert code == 0 and "gpt2-tiny" in out and (hub_env / "CACHEDIR.TAG").exists()
    (hub_env / "CACHEDIR.TAG").unlink()
    (hub_env / "gpt2hub-cache.json").unlink()
    server.close()
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", dtype="bfloat16")), first)  # nothing downloaded again
    assert (hub_env / "CACHEDIR.TAG").exists() and (hub_env / "gpt2hub-cache.json").exists()


# 2. a revision is part of what is cached ----------------------------------------------------------------------------
@pytest.fixture
def hub_revisions(hub_env, server, hf_cache_dir):
    """The stand-in Hub with a second commit (other weights) under tag v1."""
    other = random_weights(TINY_HP, seed=7)
    folder = hf_cache_dir.parent / "v1"
    write_hf_folder(folder, TINY_HP, other, placeholder_vocab())
    for f in folder.iterdir():
        server.served.files[f"/hf/{COMMIT2}/{TINY.hf_repo}/{f.name}"] = f.read_bytes()
    for name in ("vocab.json", "merges.txt"):  # the vocabulary is the same in both commits
        server.served.files[f"/hf/{COMMIT2}/{TINY.hf_repo}/{name}"] = server.served.files[f"/hf/{TINY.hf_repo}/{name}"]
    server.served.revisions["v1"] = COMMIT2
    return server


@pytest.fixture
def hf_cache_dir(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    root = tmp_path / "hf_home" / "hub"
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    return root


def test_each_revision_is_its_own_entry_and_never_answers_for_another(hub_env, hub_revisions, capsys):
    main_ = _logits(from_pretrained("gpt2-tiny", source="hf"))
    v1 = _logits(from_pretrained("gpt2-tiny", source="hf", revision="v1"))
    assert not torch.equal(main_, v1)
    n = len(hub_revisions.served.log)
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf")), main_)  # warm: no request, main's
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf", revision="v1")), v1)
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", source="hf", revision=COMMIT2)), v1)  # a commit itself
    assert len(hub_revisions.served.log) == n
    assert json.loads((hub_env / "hf/tiny/refs.json").read_text()) == {"main": COMMIT, "v1": COMMIT2}
    code, out, _ = _cli(capsys, "cache", "list")
    assert code == 0 and f"hf@{COMMIT[:8]}" in out and f"hf@{COMMIT2[:8]}" in out and "revision v1" in out


def test_an_unknown_revision_on_a_warm_cache_is_asked_of_the_hub(hub_env, hub_revisions, monkeypatch):
    from_pretrained("gpt2-tiny", source="hf")
    n = len(hub_revisions.served.log)
    for revision in ("does-not-exist", "ünïcödé"):
        with pytest.raises(DownloadError, match=f"revision '{revision}' does not exist in {TINY.hf_repo}"):
            from_pretrained("gpt2-tiny", source="hf", revision=revision)
    assert len(hub_revisions.served.log) > n  # asked, not answered by the cached main
    monkeypatch.setenv("GPT2HUB_OFFLINE", "1")
    n = len(hub_revisions.served.log)
    with pytest.raises(OfflineError, match="revision does-not-exist") as e:
        from_pretrained("gpt2-tiny", source="hf", revision="does-not-exist")
    assert "\n" not in str(e.value) and len(hub_revisions.served.log) == n


@pytest.mark.parametrize("revision", ["../..", "x" * 5000, "main\n", "a b", "v1..v2", "/main", "refs/heads/x.lock", ""])
def test_a_revision_that_cannot_be_a_git_ref_is_refused_before_any_request(hub_env, hub_revisions, revision, capsys):
    with pytest.raises(ValueError, match="cannot be a git branch, tag or commit") as e:
        from_pretrained("gpt2-tiny", source="hf", revision=revision)
    assert len(str(e.value)) < 400 and hub_revisions.served.log == []
    code, _, err = _cli(capsys, "download", "gpt2-tiny", "--source", "hf", "--revision", revision)
    assert code == 2 and err.count("\n") == 1 and hub_revisions.served.log == []


@pytest.mark.parametrize("v1_commit", [COMMIT2, COMMIT], ids=["v1 another commit", "v1 the default's commit"])
def test_the_default_revisions_pin_holds_whatever_else_was_fetched(hub_env, hub_revisions, monkeypatch, v1_commit,
                                                                   capsys):
    hub_revisions.served.revisions["v1"] = v1_commit
    monkeypatch.setitem(TINY.sha256, "hf", {"model.safetensors": "0" * 64})  # what the real file would be pinned to
    with pytest.raises(IntegrityError, match="pinned"):
        from_pretrained("gpt2-tiny", source="hf")  # the default revision, cold: refused
    from_pretrained("gpt2-tiny", source="hf", revision="v1")  # no pins are known for other revisions
    with pytest.raises(IntegrityError, match="model.safetensors.*pinned"):
        from_pretrained("gpt2-tiny", source="hf")  # still refused: the pin is never bypassed
    code, out, _ = _cli(capsys, "cache", "verify")
    if v1_commit == COMMIT:  # the default revision's commit holds a file that is not the pinned one: said so
        assert code == 1 and "not the published file" in out


# 3. a mirror does not share the cache's files -------------------------------------------------------------------------
@pytest.mark.parametrize("link", [False, True], ids=["copies (default)", "--link"])
def test_editing_the_mirror_in_place_changes_the_cache_only_with_link(hub_env, server, tmp_path, capsys, caplog, link):
    before = from_pretrained("gpt2-tiny").trf_blocks[0].att.W_query.weight.clone()
    mirror = tmp_path / "mirror"
    assert _cli(capsys, "mirror", str(mirror), *(["--link"] if link else []))[0] == 0
    data = mirror / TINY.size / DATA
    entries, _ = read_index(mirror / TINY.size / "model.ckpt.index")
    st = data.stat()
    os.chmod(data, 0o644)  # (a --link mirror shares the cache's read-only mode: rsync, as root, writes anyway)
    with open(data, "r+b") as f:  # what `rsync --inplace -t` does: the same file, new bytes, the old timestamp
        f.seek(entries["model/h0/attn/c_attn/w"].offset)  # W_query's first weight
        f.write(b"\x00\x00\x80\x7f")
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    cached = (hub_env / "openai/tiny/raw/hparams.json").read_bytes()
    os.chmod(mirror / TINY.size / "hparams.json", 0o644)
    with open(mirror / TINY.size / "hparams.json", "w") as f:  # rewritten in place
        f.write(json.dumps({**TINY_HP, "n_layer": 5}))
    changed = (hub_env / "openai/tiny/raw/hparams.json").read_bytes() != cached
    assert changed == link  # a hard link shares the cache's file, as --link's help says; a copy never does
    if not link:
        assert torch.equal(from_pretrained("gpt2-tiny").trf_blocks[0].att.W_query.weight, before)
        assert _cli(capsys, "cache", "verify")[0] == 0 and "damaged" not in caplog.text


def test_files_handed_out_honour_the_umask_and_the_caches_own_are_read_only(hub_env, server, tmp_path, capsys):
    gpt2hub.download_files("gpt2-tiny")
    old = os.umask(0o027)
    try:
        assert _cli(capsys, "mirror", str(tmp_path / "mirror"))[0] == 0
        gpt2hub.download_and_load_gpt2("tiny", str(tmp_path / "models"))
    finally:
        os.umask(old)
    for name in (DATA, "hparams.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "mirror" / TINY.size / name).st_mode) == 0o640
        assert stat.S_IMODE(os.stat(tmp_path / "models" / TINY.size / name).st_mode) == 0o640
        assert stat.S_IMODE(os.stat(hub_env / "openai/tiny/raw" / name).st_mode) == 0o444
    assert stat.S_IMODE(os.stat(tmp_path / "mirror/SHA256SUMS").st_mode) == 0o640


def test_mirror_link_hard_links_only_when_asked_and_says_what_it_means(hub_env, server, tmp_path, capsys):
    gpt2hub.download_files("gpt2-tiny")
    assert _cli(capsys, "mirror", str(tmp_path / "linked"), "--link")[0] == 0
    assert os.path.samefile(tmp_path / "linked" / TINY.size / DATA, hub_env / "openai/tiny/raw" / DATA)
    code, out, _ = _cli(capsys, "mirror", "--help")
    assert code == 0 and "--link" in " ".join(out.split()) and "changes the cache too" in " ".join(out.split())


# 4. an export owns its folder -----------------------------------------------------------------------------------------
def _foreign_tokenizer(folder) -> None:
    """Another model's tokenizer files, as a folder used for an earlier export may hold them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"Hello": 0, "world": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "tokenizer_class":
                                                              "PreTrainedTokenizerFast"}))


def test_export_refuses_a_folder_with_files_unless_told_to_overwrite_and_then_owns_it(hub_env, server, tmp_path,
                                                                                      capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "export"
    _foreign_tokenizer(out)
    (out / "README.md").write_text("my notes")
    before = _snapshot(out)
    code, _, err = _cli(capsys, "export", "gpt2-tiny", str(out))
    assert code == 2 and "is not empty" in err and "--overwrite" in err and err.count("\n") == 1
    assert _snapshot(out) == before and server.served.log == []  # refused before anything was loaded
    old = os.umask(0o022)
    try:
        assert _cli(capsys, "export", "gpt2-tiny", str(out), "--overwrite")[0] == 0
    finally:
        os.umask(old)
    assert not (out / "tokenizer.json").exists() and not (out / "special_tokens_map.json").exists()
    assert (out / "README.md").read_text() == "my notes"  # not an export's file: left alone
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995] and tok.eos_token == "<|endoftext|>"
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())


def test_from_pretrained_loads_every_format_export_writes(hub_env, server, tmp_path):
    model = from_pretrained("gpt2-tiny")
    for fmt in ("hf", "safetensors"):
        folder = gpt2hub.export.export_model("gpt2-tiny", tmp_path / fmt, format=fmt)
        assert torch.allclose(_logits(from_pretrained(folder)), _logits(model), atol=1e-5), fmt
        assert gpt2hub.load_tokenizer(folder).encode("Hello world") == [15496, 995]


# 5. cache verify does what it says ----------------------------------------------------------------------------------
def _damage_in_place(path) -> None:
    """One flipped byte, the size and the timestamp kept: only reading the file can tell."""
    st = path.stat()
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("what", ["data file", "converted"])
def test_verify_marks_damage_so_that_the_next_load_repairs_it(hub_env, server, capsys, what):
    dtype = "float32" if what == "data file" else "bfloat16"
    first = _logits(from_pretrained("gpt2-tiny", dtype=dtype))
    path = hub_env / ("openai/tiny/raw/" + DATA if what == "data file" else "openai/tiny/converted/bfloat16.safetensors")
    _damage_in_place(path)
    code, out, err = _cli(capsys, "cache", "verify")
    assert code == 1 and str(path) in out and "damaged" in out and "marked: the next load repairs" in err
    gets = len(server.served.requests("GET", DATA))
    assert torch.equal(_logits(from_pretrained("gpt2-tiny", dtype=dtype)), first)
    assert len(server.served.requests("GET", DATA)) == gets + (what == "data file")  # downloaded again, or converted
    assert _cli(capsys, "cache", "verify")[0] == 0


def test_download_does_not_call_a_file_verify_found_damaged_cached(hub_env, server, capsys):
    gpt2hub.download_files("gpt2-tiny")
    _damage_in_place(hub_env / "openai/tiny/raw" / DATA)
    assert _cli(capsys, "cache", "verify")[0] == 1
    assert _cli(capsys, "download", "gpt2-tiny")[0] == 0
    assert len(server.served.requests("GET", DATA)) == 2 and _cli(capsys, "cache", "verify")[0] == 0


def test_verify_repair_repairs_now(hub_env, server, capsys):
    gpt2hub.download_files("gpt2-tiny")
    from_pretrained("gpt2-tiny", dtype="bfloat16")
    _damage_in_place(hub_env / "openai/tiny/raw" / DATA)
    _damage_in_place(hub_env / "openai/tiny/converted/bfloat16.safetensors")
    code, out, _ = _cli(capsys, "cache", "verify", "--repair")
    assert code == 0 and "2 problem(s)" in out and "repaired" in out
    assert len(server.served.requests("GET", DATA)) == 2
    server.close()
    assert _cli(capsys, "cache", "verify")[0] == 0
    from_pretrained("gpt2-tiny", dtype="bfloat16")  # no network needed: everything was repaired


def test_verify_on_a_missing_or_empty_cache_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPT2HUB_CACHE", str(tmp_path / "nothing-here"))
    code, out, _ = _cli(capsys, "cache", "verify")
    assert code == 0 and "there is no gpt2hub cache at" in out
    (tmp_path / "nothing-here").mkdir()
    code, out, _ = _cli(capsys, "cache", "verify")
    assert code == 0 and "holds no model" in out
    code, out, _ = _cli(capsys, "cache", "list")
    assert code == 0 and "is empty" in out


def test_listing_and_verifying_touch_nothing_and_verify_names_a_linked_folder(hub_env, server, tmp_path, capsys):
    from_pretrained("gpt2-tiny")
    outside = tmp_path / "outside"
    (hub_env / "openai/tiny/raw").rename(outside)
    (hub_env / "openai/tiny/raw").symlink_to(outside)
    before = _snapshot(hub_env)
    assert _cli(capsys, "cache", "list")[0] == 0 and _snapshot(hub_env) == before
    code, out, _ = _cli(capsys, "cache", "verify")
    assert code == 1 and "a link or file where gpt2hub keeps a folder" in out and _snapshot(hub_env) == before
    from_pretrained("gpt2-tiny")  # the load removes the link (never following it) and fetches the files again
    assert not (hub_env / "openai/tiny/raw").is_symlink() and len(list(outside.iterdir())) == 7


def test_prune_removes_old_temporary_files_of_the_marker_and_refs_only(hub_env, server, capsys):
    gpt2hub.download_files("gpt2-tiny")
    (hub_env / "hf/tiny").mkdir(parents=True)
    old = [hub_env / ".CACHEDIR.TAG.k3j4h5g6.tmp", hub_env / ".gpt2hub-cache.json.a1b2c3d4.tmp",
           hub_env / "hf/tiny/.refs.json.zz99yy88.tmp"]
    fresh, mine = hub_env / ".gpt2hub-cache.json.q1w2e3r4.tmp", hub_env / ".notes.backup.tmp"
    for p in [*old, fresh, mine]:
        p.write_text("x")
    for p in [*old, mine]:
        os.utime(p, (1, 1))  # long ago
    assert _cli(capsys, "cache", "prune")[0] == 0
    assert not any(p.exists() for p in old) and fresh.exists() and mine.exists()
