"""Attacks on int8/int4 storage: a careless or hostile user editing, replacing or linking the quantized file and its
manifest, processes killed mid-quantizing, two at once, read-only caches, full disks, odd weights.

Each ends in a correct load (quantized again) or a one-line typed error naming the file and what to do: never a
segfault, a traceback, or logits other than the true quantized model's.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY64

from gpt2hub import from_pretrained
from gpt2hub.errors import GPT2HubError
from gpt2hub.files import crc32c_file
from gpt2hub.inventory import model_entry

X = torch.arange(40)[None] * 7


@pytest.fixture(autouse=True)
def _pinless(monkeypatch):
    monkeypatch.setenv("GPT2HUB_IGNORE_PINS", "1")  # the test checkpoints have random weights


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).float()


def _typed(e: BaseException, *words: str) -> None:
    """A gpt2hub error in one line, naming each of `words`."""
    assert isinstance(e, GPT2HubError), f"{type(e).__name__} escaped: {e}"
    assert "\n" not in str(e) and all(w in str(e) for w in words), str(e)


def _paths(cache: Path, dtype: str) -> tuple[Path, Path]:
    converted = model_entry(cache, TINY64.name).converted
    return converted / f"{dtype}.safetensors", converted / f"{dtype}.json"


def _edit_manifest(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    for k in [k for k, v in changes.items() if v is _DROP]:
        del data[k]
    os.chmod(path, 0o644)
    path.write_text(json.dumps(data))


_DROP = object()


def _vouch(stored: Path, manifest: Path) -> None:
    """Record the stored file's present size, mtime and crc32c in its manifest, as a hostile user would."""
    st = stored.stat()
    _edit_manifest(manifest, bytes=st.st_size, mtime_ns=st.st_mtime_ns, crc32c=crc32c_file(stored))


def _loads_as_before(scheme: str, first: torch.Tensor) -> None:
    """A load now gives the true quantized model's logits, whatever was done to its stored weights."""
    assert torch.equal(_logits(from_pretrained(TINY64.name, dtype=scheme)), first)


MANIFEST_EDITS = {  # each on the scheme where it matters (group_size: int4's)
    "group_size as a string": ("int4", {"group_size": "64"}),
    "group_size 0": ("int4", {"group_size": 0}),
    "group_size -1": ("int4", {"group_size": -1}),
    "group_size 10**9": ("int4", {"group_size": 10**9}),
    "group_size missing": ("int4", {"group_size": _DROP}),
    "group_size 64 for int8": ("int8", {"group_size": 64}),
    "head tied": ("int8", {"head": "tied"}),
    "head int4 for int8": ("int8", {"head": "int4"}),
    "head missing": ("int4", {"head": _DROP}),
    "scheme int2": ("int8", {"scheme": "int2"}),
    "scheme int8 for int4": ("int4", {"scheme": "int8"}),
    "scheme missing": ("int8", {"scheme": _DROP}),
    "an extra field": ("int8", {"surprise": [1, 2, 3]}),
    "kind converted": ("int8", {"kind": "converted"}),
    "kind mapped": ("int4", {"kind": "mapped"}),
    "crc32c null": ("int8", {"crc32c": None}),
    "bytes a string": ("int4", {"bytes": "123"}),
    "config of another width": ("int8", {"config": {"n_vocab": 50257, "n_ctx": 64, "n_embd": 128, "n_head": 2,
                                                    "n_layer": 2}}),
}


@pytest.mark.parametrize("edit", list(MANIFEST_EDITS))
def test_an_edited_manifest_is_quantized_again(hub_env, server, edit):
    scheme, changes = MANIFEST_EDITS[edit]
    first = _logits(from_pretrained(TINY64.name, dtype=scheme))
    _edit_manifest(_paths(hub_env, scheme)[1], **changes)
    _loads_as_before(scheme, first)
    assert _paths(hub_env, scheme)[1].read_text() != "" and not _verify_problems(hub_env)


def _verify_problems(cache: Path) -> list:
    from gpt2hub.checks import verify

    return verify(model_entry(cache, TINY64.name))


# the stored file replaced, linked, truncated, its header edited ------------------------------------------------------
def _header(stored: Path) -> tuple[dict, bytes]:
    raw = stored.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _rewrite(stored: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    os.chmod(stored, 0o644)
    stored.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def _tensors(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


def _past_the_end(h: dict) -> None:
    last = max(_tensors(h), key=lambda k: h[k]["data_offsets"][1])
    h[last]["data_offsets"] = [h[last]["data_offsets"][0] + 64, h[last]["data_offsets"][1] + 64]


def _overlapping(h: dict) -> None:
    a, b = [k for k in _tensors(h) if k.endswith("qweight")][:2]
    if h[a]["data_offsets"][1] - h[a]["data_offsets"][0] == h[b]["data_offsets"][1] - h[b]["data_offsets"][0]:
        h[b]["data_offsets"] = list(h[a]["data_offsets"])
    else:
        h[b]["data_offsets"][0] -= 64


def _swapped_dtype(h: dict) -> None:
    for k in _tensors(h):
        if h[k]["dtype"] in ("I8", "U8"):
            h[k]["dtype"] = "U8" if h[k]["dtype"] == "I8" else "I8"


def _other_shape(h: dict) -> None:
    k = next(k for k in _tensors(h) if k.endswith("qweight"))
    h[k]["shape"] = [h[k]["shape"][1], h[k]["shape"][0]]


HEADER_EDITS = {"offsets past the end": _past_the_end, "overlapping offsets": _overlapping,
                "int8 and uint8 swapped": _swapped_dtype, "a transposed shape": _other_shape}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("edit", list(HEADER_EDITS))
def test_an_edited_header_vouched_for_by_its_manifest_is_quantized_again(hub_env, server, scheme, edit):
    """The manifest records the edited file's size, mtime and crc32c: only reading the header can tell."""
    first = _logits(from_pretrained(TINY64.name, dtype=scheme))
    stored, manifest = _paths(hub_env, scheme)
    header, data = _header(stored)
    HEADER_EDITS[edit](header)
    _rewrite(stored, header, data)
    _vouch(stored, manifest)
    _loads_as_before(scheme, first)


def _replace(stored: Path, how: str, outside: Path) -> None:
    body = stored.read_bytes()
    os.chmod(stored, 0o644)
    stored.unlink()
    if how == "a link to a copy outside":
        (outside / "copy.safetensors").write_bytes(body)
        stored.symlink_to(outside / "copy.safetensors")
    elif how == "a link to other bytes outside":
        (outside / "other.safetensors").write_bytes(b"\0" * len(body))
        stored.symlink_to(outside / "other.safetensors")
    elif how == "a folder":
        stored.mkdir()
        (stored / "inside").write_bytes(b"x")
    elif how == "an empty file":
        stored.write_bytes(b"")
    elif how == "truncated":
        stored.write_bytes(body[:len(body) // 2])
    elif how == "a FIFO":
        os.mkfifo(stored)


REPLACEMENTS = {"a link to a copy outside": "int8", "a link to other bytes outside": "int4", "a folder": "int8",
                "an empty file": "int4", "truncated": "int8", "a FIFO": "int4"}


@pytest.mark.parametrize("how", list(REPLACEMENTS))
def test_a_replaced_stored_file_is_quantized_again_and_nothing_outside_changes(hub_env, server, tmp_path, how):
    scheme = REPLACEMENTS[how]
    first = _logits(from_pretrained(TINY64.name, dtype=scheme))
    stored, manifest = _paths(hub_env, scheme)
    outside = tmp_path / "outside"
    outside.mkdir()
    _replace(stored, how, outside)
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    if how == "a folder":  # what is in it may be the user's: refused, before quantizing, saying what to do
        with pytest.raises(GPT2HubError) as e:
            from_pretrained(TINY64.name, dtype=scheme)
        _typed(e.value, str(stored), "is a folder", "remove it by hand")
        assert [p.name for p in stored.iterdir()] == ["inside"]
        os.unlink(stored / "inside")
        os.rmdir(stored)
    _loads_as_before(scheme, first)
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before


def test_an_int4_file_renamed_to_int8_with_its_manifest_edited_to_match(hub_env, server):
    first = _logits(from_pretrained(TINY64.name, dtype="int8"))
    from_pretrained(TINY64.name, dtype="int4")
    int8, manifest = _paths(hub_env, "int8")
    int4, _ = _paths(hub_env, "int4")
    os.chmod(int8, 0o644)
    os.replace(int4, int8)
    _vouch(int8, manifest)
    _loads_as_before("int8", first)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_file_written_by_safetensors_itself_is_read_right_though_its_codes_are_not_aligned(hub_env, server, scheme):
    """safetensors' save_file pads its header to 8 bytes, not 64: the codes land off PyTorch's kernels' alignment."""
    from safetensors.torch import load_file, save_file

    from gpt2hub import quant

    first = _logits(from_pretrained(TINY64.name, dtype=scheme))
    stored, manifest = _paths(hub_env, scheme)
    tensors = load_file(stored)
    os.chmod(stored, 0o644)
    for pad in range(0, 64, 8):  # metadata of another length moves the data off 64 bytes
        save_file(tensors, stored, metadata={"format": "pt", "pad": "x" * pad})
        header, _ = _header(stored)
        n = int.from_bytes(stored.read_bytes()[:8], "little")
        if all((8 + n + header[k]["data_offsets"][0]) % 64 for k in _tensors(header) if k.endswith("qweight")):
            break
    else:
        pytest.fail("safetensors aligned every layout tried")
    _vouch(stored, manifest)
    model = from_pretrained(TINY64.name, dtype=scheme)
    assert torch.equal(_logits(model), first)
    assert quant.KERNELS or pytest.skip("no int8/int4 kernel on this CPU: nothing to misalign")


# processes killed or racing -------------------------------------------------------------------------------------------
WORKER = str(Path(__file__).parent / "quant_worker.py")


def _worker(scheme: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, scheme], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})


def _temporaries(converted: Path) -> list[Path]:
    return sorted(p for p in converted.iterdir() if p.name.endswith(".tmp")) if converted.is_dir() else []


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_kill_9_while_quantizing_leaves_no_stored_file_and_prune_removes_the_temporary(hub_env, server, scheme,
                                                                                      capsys):
    from gpt2hub.checks import verify
    from gpt2hub.cli import main

    converted = model_entry(hub_env, TINY64.name).converted
    proc = _worker(scheme, GPT2HUB_TEST_SLOW_WRITE="0.5")
    end = time.monotonic() + 120
    while not any(p.stat().st_size > 4096 for p in _temporaries(converted)):
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            pytest.fail(f"the worker never began writing (rc {proc.poll()}): {proc.communicate()[1][-500:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    left = _temporaries(converted)
    assert left and not (converted / f"{scheme}.safetensors").exists() and not (converted / f"{scheme}.json").exists()
    assert left == [p for p in model_entry(hub_env, TINY64.name).partials() if p.parent == converted]
    model = from_pretrained(TINY64.name, dtype=scheme)
    assert main(["cache", "prune"]) == 0
    assert _temporaries(converted) == [] and verify(model_entry(hub_env, TINY64.name)) == []
    assert torch.equal(_logits(model), _logits(from_pretrained(TINY64.name, dtype=scheme)))
    capsys.readouterr()


def test_two_processes_on_a_cold_cache_quantize_once_and_get_the_same_logits(hub_env, server, tmp_path):
    counter = tmp_path / "prepared"
    counter.touch()
    procs = [_worker("int8", GPT2HUB_TEST_PREPARED=str(counter)) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outs]
    digests = {out.strip() for out, _ in outs}
    assert len(digests) == 1 and len(counter.read_text().split()) == 1
    import hashlib

    mine = hashlib.sha256(_logits(from_pretrained(TINY64.name, dtype="int8")).numpy().tobytes()).hexdigest()
    assert digests == {mine} and len(counter.read_text().split()) == 1


# read-only caches, full disks -----------------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_read_only_cache_loads_the_int8_it_holds(hub_env, server, read_only):
    first = _logits(from_pretrained(TINY64.name, dtype="int8"))
    read_only()
    before = _snapshot(hub_env)
    assert torch.equal(_logits(from_pretrained(TINY64.name, dtype="int8")), first)
    assert _snapshot(hub_env) == before


@pytest.mark.parametrize("held", ["float32 only", "int8, its manifest naming another head", "int8, its file truncated"])
def test_a_read_only_cache_without_usable_int8_refuses_in_one_line_and_changes_nothing(hub_env, server, read_only,
                                                                                     held):
    from_pretrained(TINY64.name, dtype="float32" if held == "float32 only" else "int8")
    if held != "float32 only":
        stored, manifest = _paths(hub_env, "int8")
        if "manifest" in held:
            _edit_manifest(manifest, head="tied")
        else:
            _replace(stored, "truncated", hub_env)
    read_only()
    before = _snapshot(hub_env)
    with pytest.raises(GPT2HubError) as e:
        from_pretrained(TINY64.name, dtype="int8")
    _typed(e.value, str(hub_env), "GPT2HUB_CACHE")
    assert _snapshot(hub_env) == before


def _flip_a_byte(stored: Path) -> None:
    """One byte of the codes changed, size and timestamps kept: only a full check sees it."""
    st = stored.stat()
    os.chmod(stored, 0o644)
    with open(stored, "r+b") as f:
        f.seek(st.st_size - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x5A]))
    os.chmod(stored, 0o444)
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.fixture
def small_disk(hub_env):
    """A tmpfs mounted on the entry's converted/ folder: `small_disk(options)` (size=4m fills up mid-write,
    nr_inodes=2 refuses to create a file); unmounted after. Skipped, saying why, where mounting is not allowed."""
    mounted = []

    def make(options: str) -> None:
        folder = model_entry(hub_env, TINY64.name).converted
        folder.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode()[:100]}")
        mounted.append(folder)

    def unmount() -> None:
        while mounted:
            subprocess.run(["umount", str(mounted.pop())], check=True)

    make.unmount = unmount  # type: ignore[attr-defined]
    yield make
    unmount()


@pytest.mark.parametrize("options", ["size=4m", "nr_inodes=2"], ids=["full mid-write", "no file can be made"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_full_disk_while_quantizing_is_one_line_and_leaves_nothing_half_written(hub_env, server, small_disk,
                                                                                  scheme, options):
    small_disk(options)
    converted = model_entry(hub_env, TINY64.name).converted
    with pytest.raises(GPT2HubError) as e:
        from_pretrained(TINY64.name, dtype=scheme)
    _typed(e.value, "no space left", str(converted), "free some space")
    assert sorted(p.name for p in converted.iterdir()) in ([], ["float32.json"])
    gets = len(server.served.log)
    small_disk.unmount()
    model = from_pretrained(TINY64.name, dtype=scheme)  # space freed: quantized, nothing downloaded again
    assert len(server.served.log) == gets
    assert torch.equal(_logits(model), _logits(from_pretrained(TINY64.name, dtype=scheme)))


# the CLI's cache commands, mirror and export with quantized files present -------------------------------------------
def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from gpt2hub.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


DAMAGES = {"a byte flipped in place": lambda stored, manifest: _flip_a_byte(stored),
           "truncated": lambda stored, manifest: _replace(stored, "truncated", stored.parent),
           "a link": lambda stored, manifest: _replace(stored, "a link to a copy outside", stored.parent.parent),
           "the manifest naming another head": lambda stored, manifest: _edit_manifest(manifest, head="tied")}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_cache_verify_reports_damaged_int4_and_repair_quantizes_it_again(hub_env, server, capsys, damage):
    first = _logits(from_pretrained(TINY64.name, dtype="int4"))
    from_pretrained(TINY64.name, dtype="int8")
    stored, manifest = _paths(hub_env, "int4")
    DAMAGES[damage](stored, manifest)
    code, out, err = _cli(capsys, "cache", "verify")
    assert code == 1 and "int4" in out + err, out + err
    code, out, err = _cli(capsys, "cache", "verify", "--repair")
    assert code == 0 and "repaired" in out, out + err
    assert _cli(capsys, "cache", "verify")[0] == 0
    requests = len(server.served.log)
    assert torch.equal(_logits(from_pretrained(TINY64.name, dtype="int4")), first)
    assert len(server.served.log) == requests and _paths(hub_env, "int8")[0].is_file()


# folders read in place, and weights that are not ordinary numbers ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny64_float(tiny64_folder):
    return from_pretrained(tiny64_folder[0])


@pytest.mark.parametrize("layout", ["openai", "hf", "safetensors"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_kind_of_folder_loads_as_the_cache_quantizes_it(hub_env, server, tiny64_folder, tiny64_float, tmp_path,
                                                              layout, scheme):
    from gpt2hub import save_pretrained

    folder = tiny64_folder[0] if layout == "openai" else save_pretrained(tiny64_float, tmp_path / layout, layout)
    before = _snapshot(Path(folder))
    model = from_pretrained(folder, dtype=scheme)
    assert torch.equal(_logits(model), _logits(from_pretrained(TINY64.name, dtype=scheme)))
    assert _snapshot(Path(folder)) == before  # read in place: nothing written there


def test_int4_of_a_hugging_face_folder_too_narrow_for_its_groups_is_refused_in_one_line(hf_folder):
    from gpt2hub import ConversionError

    with pytest.raises(ConversionError) as e:
        from_pretrained(hf_folder, dtype="int4")
    _typed(e.value, str(hf_folder), "emb_dim=32", "dtype='int8'")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_folder_with_non_finite_weights_is_refused_naming_the_file(tiny64_float, tmp_path, value):
    from gpt2hub import ConversionError, save_pretrained

    sd = {k: v.clone() for k, v in tiny64_float.state_dict().items()}
    sd["trf_blocks.1.ff.layers.0.weight"][5, 7] = value
    broken = type(tiny64_float).from_state_dict(tiny64_float.cfg, sd)
    folder = save_pretrained(broken, tmp_path / "diverged")
    for scheme in ("int8", "int4"):
        with pytest.raises(ConversionError) as e:
            from_pretrained(folder, dtype=scheme)
        _typed(e.value, str(folder / "model.safetensors"), scheme, "NaN or infinite", "trf_blocks.1.ff.layers.0.weight")



CFG = {"vocab_size": 8, "context_length": 4, "emb_dim": 64, "n_heads": 1, "n_layers": 1, "qkv_bias": True,
       "drop_rate": 0.0}
FF = "trf_blocks.0.ff.layers.0"


def _with_ff_weight(edit) -> dict[str, torch.Tensor]:
    """A random GPTModel state_dict whose first feed-forward weight [256, 64] is `edit`ed in place."""
    from gpt2hub.model import GPTModel

    torch.manual_seed(0)
    sd = {k: v.detach().clone() for k, v in GPTModel(CFG).state_dict().items()}
    edit(sd[f"{FF}.weight"])
    return sd


def _dequantized(sd: dict[str, torch.Tensor], scheme: str) -> torch.Tensor:
    from gpt2hub import quant

    stored = quant.quantize_state_dict(sd, scheme, head="tied")
    return quant.quantized_model(CFG, stored, scheme, head="tied").get_submodule(FF).dequantize(torch.float32)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_state_dict_refuses_non_finite_weights_naming_the_tensor(scheme, value):
    from gpt2hub import quant

    sd = _with_ff_weight(lambda w: w[3, 5].fill_(value))
    with pytest.raises(ValueError, match=rf"sd\['{FF}.weight'\] holds NaN or infinite values") as e:
        quant.quantize_state_dict(sd, scheme)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_huge_and_zero_rows_quantize_to_finite_weights_within_their_step(scheme):
    """Rows of +-3e38 (bfloat16's and float32's edge: a group's range overflows float32), rows of 1e-30, zero rows."""
    def edit(w: torch.Tensor) -> None:
        w[0].uniform_(-1, 1).mul_(3e38)
        w[1, ::2], w[1, 1::2] = 3e38, -3e38
        w[2].mul_(1e-30)
        w[3].zero_()

    sd = _with_ff_weight(edit)
    w, got = sd[f"{FF}.weight"].double(), _dequantized(sd, scheme).double()
    assert torch.isfinite(got).all()
    assert torch.equal(got[3], torch.zeros(64, dtype=torch.float64))
    step = (w.amax(1) - w.amin(1)) / (15 if scheme == "int4" else 254)  # one code's width over a whole row
    assert ((got - w).abs() <= step[:, None] * 1.01).all()


def test_mirror_of_an_entry_holding_int8_copies_only_the_published_files(hub_env, server, tmp_path, capsys):
    first = _logits(from_pretrained(TINY64.name, dtype="int8"))
    code, out, err = _cli(capsys, "mirror", str(tmp_path / "mirror"), TINY64.name)
    assert code == 0, err
    mirrored = tmp_path / "mirror" / TINY64.size
    from gpt2hub.registry import OPENAI_FILES

    assert sorted(p.name for p in mirrored.iterdir()) == sorted(OPENAI_FILES)
    assert torch.equal(_logits(from_pretrained(mirrored, dtype="int8")), first)


@pytest.mark.parametrize("damage", ["a link", "truncated", "the manifest naming another head"])
def test_cache_rm_dtype_int4_removes_damaged_int4_and_leaves_int8(hub_env, server, capsys, damage):
    first = _logits(from_pretrained(TINY64.name, dtype="int8"))
    from_pretrained(TINY64.name, dtype="int4")
    stored, manifest = _paths(hub_env, "int4")
    DAMAGES[damage](stored, manifest)
    code, out, err = _cli(capsys, "cache", "rm", TINY64.name, "--dtype", "int4", "-y")
    assert code == 0, out + err
    assert not os.path.lexists(stored) and not os.path.lexists(manifest)
    if damage == "a link":  # the link went, what it pointed to stayed
        assert (stored.parent.parent / "copy.safetensors").is_file()
    assert torch.equal(_logits(from_pretrained(TINY64.name, dtype="int8")), first)
