"""`gpt2hub bench`: cold load, conversion, warm load, first token and generation, timed beside the references.

Loads are timed in fresh processes (imports excluded), generation in this process with the same weights and threads
for every implementation. Without a real checkpoint in the cache, a full-size one with random weights is generated
in OpenAI's layout and served from 127.0.0.1.

Decoding is timed directly: each implementation marks the arrival of every new column (`Marks`), and the rate is the
tokens after the first over the time from the first column to the last, per run. Every run is checked before it is
reported (`check_generation`, `check_results`): it must produce every token asked for, and neither its first token
nor a decoding step may take less than reading the weights once at GENEROUS times the copy bandwidth measured in the
same run, or less than the timer resolves. A run that fails is a MeasurementError naming it, never a number.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import http.server
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__
from .cache import Cache, EntryKey
from .errors import GPT2HubError
from .files import default_root
from .registry import DTYPES, OPENAI_FILES, ModelSpec, dtype_name, register, resolve


@dataclass
class BenchConfig:
    """What `gpt2hub bench` measures; the defaults are the full run (under 3 minutes on a quiet 2-core CPU)."""

    model: str = "gpt2-small"
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    prompt_lengths: list[int] = field(default_factory=lambda: [16, 512])
    new_tokens: int = 32  # per timing; the rate is timed over the tokens after the first
    repeats: int = 3
    load_repeats: int | None = None  # warm and cold loads (each a fresh process); None: `repeats`
    real_cache: bool = False  # time warm loads and generation on the user's own cache; no cold load
    transformers: bool = True
    notebook: bool = True
    plots: bool = True
    cold: bool = True  # cold loads: an empty cache fed from 127.0.0.1, beside a plain copy of the same bytes
    quick: bool = False  # made by quick_config()

    def __post_init__(self) -> None:
        if self.new_tokens < 2:
            raise ValueError(f"new_tokens={self.new_tokens}: at least 2, as the decoding rate is timed over the tokens "
                             "after the first")
        if self.repeats < 1 or self.loads < 1 or not (self.batch_sizes and self.prompt_lengths and self.devices and self.dtypes):
            raise ValueError("repeats and load_repeats must be at least 1, and batch_sizes, prompt_lengths, devices and "
                             "dtypes non-empty")

    @property
    def loads(self) -> int:
        """Loads timed of each kind (warm, cold), each in a fresh process."""
        return self.repeats if self.load_repeats is None else self.load_repeats


def quick_config(**changes: Any) -> BenchConfig:
    """`gpt2hub bench --quick`, under a minute on a 2-core CPU: two warm loads each, and generation at batch 1 with a
    16-token prompt and 16 new tokens, beside transformers; no cold loads, no notebook path, no plots. `changes`
    override any field."""
    settings = {"batch_sizes": [1], "prompt_lengths": [16], "new_tokens": 16, "load_repeats": 2, "cold": False,
                "notebook": False, "plots": False, **changes}
    return BenchConfig(**settings, quick=True)


# -- the machine ------------------------------------------------------------------------------------------------------
VECTOR_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16",
                          "amx_int8", "amx_tile"})


def machine_info() -> dict[str, Any]:
    """The machine a run measured: CPU (model, cores, vector flags), memory, GPU, versions, and which kernels run."""
    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                            "python": platform.python_version(), "torch": torch.__version__, "gpt2hub": __version__,
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    from . import native

    # the vector units the kernels use: the same CPU model name comes with and without some of them (AMX, AVX512-BF16)
    info["cpu_flags"] = sorted(native.cpu_flags() & VECTOR_FLAGS)
    info["kernels"] = native.status()
    with contextlib.suppress(OSError, ValueError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # its version, without its import's seconds
        info["transformers"] = importlib.metadata.version("transformers")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    return info


def machine_label(info: dict[str, Any]) -> str:
    return info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"


def reference_dtype(dtype: str) -> str:
    """The dtype transformers and the notebook path are timed at beside gpt2hub's `dtype`: the same for a float dtype;
    for int8 and int4, which neither has, bfloat16 (registry.DTYPES' `tensors`: the quantized models' activations)."""
    return DTYPES[dtype_name(dtype)].tensors


def model_bytes(model: Any) -> int:
    """Bytes of a model's weights as it holds them: parameters and buffers (a quantized model's codes, scales and
    biases are buffers), each storage once (a tied head is the embedding)."""
    import torch

    seen: dict[tuple[str, int], int] = {}
    for t in (*model.parameters(), *model.buffers()):
        if t.dtype != torch.bool:  # (older transformers hold the causal mask as a buffer: not weights)
            key = (str(t.device), t.data_ptr())
            seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# -- weights and a loopback server --------------------------------------------------------------------------------------
def _synthetic_spec(spec: ModelSpec) -> ModelSpec:
    """The same architecture under its own name and folder, with no pinned hashes (the weights are random)."""
    return register(replace(spec, name=f"{spec.name}-synthetic", size=f"{spec.size}-synthetic",
                            hf_repo=f"synthetic/{spec.name}-synthetic"))  # the pins stay: GPT2HUB_IGNORE_PINS=1


def _real_weights(spec: ModelSpec) -> Path | None:
    """The raw/ folder of the user's cache when it holds all seven of OpenAI's files for `spec`, else None."""
    cached = Cache(default_root()).entry(EntryKey("openai", spec.size))
    return cached.raw if all(cached.raw_path(n).exists() for n in OPENAI_FILES) else None


def prepare(spec: ModelSpec, work: Path, real_cache: bool) -> tuple[ModelSpec, Path, str]:
    """(spec to load, folder whose `{size}/` holds OpenAI's seven files, "real" or "synthetic")."""
    from .synthetic import write_openai_folder

    cached = _real_weights(spec)
    root = work / "served"
    root.mkdir(parents=True, exist_ok=True)
    if cached is not None:
        (root / spec.size).symlink_to(cached, target_is_directory=True)
        return spec, root, "real"
    if real_cache:
        raise SystemExit(f"--real-cache: {spec.name} is not fully cached in {default_root()}; run `gpt2hub download "
                         f"{spec.name}` first")
    synth = _synthetic_spec(spec)
    write_openai_folder(root / synth.size, synth)
    return synth, root, "synthetic"


def write_hf_copy(spec: ModelSpec, openai_folder: Path, dest: Path) -> Path:
    """The same weights in the layout transformers loads (model.safetensors + config.json)."""
    from .synthetic import write_hf_folder
    from .tf_checkpoint import TFCheckpoint

    with TFCheckpoint(openai_folder) as ckpt:
        weights = {n: ckpt.read(n) for n in ckpt.names()}
        vocab = ((openai_folder / "encoder.json").read_bytes(), (openai_folder / "vocab.bpe").read_bytes())
        write_hf_folder(dest, spec.hparams(), weights, vocab)
    return dest


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


# -- measurements in a fresh process -------------------------------------------------------------------------------------
def _settle() -> None:
    """Flush what earlier steps wrote, so that no step's disk writes are timed in a later one."""
    if hasattr(os, "sync"):
        os.sync()


def _in_subprocess(kind: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "gpt2hub.bench", kind, json.dumps(args)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step {kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_mib(field: str = "VmRSS") -> float:
    """Resident memory (VmRSS) or its peak since the last reset (VmHWM), from /proc; the lifetime peak elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def _first_logits(model: Any, device: str, hf: bool = False) -> None:
    import torch

    with torch.no_grad():
        out = model(torch.arange(8, device=device)[None])
        (out.logits if hf else out).sum().item()


def _notebook_model(tf: Any, folder: Path, model_class: Any, config_from_hparams: Any, load_weights: Any) -> Any:
    """The book's way: every variable through `tf.train.load_variable`, a randomly initialised GPTModel, a copy."""
    ckpt = tf.train.latest_checkpoint(str(folder)) or str(folder / "model.ckpt")
    settings = json.loads((folder / "hparams.json").read_text())
    params: dict[str, Any] = {"blocks": [{} for _ in range(settings["n_layer"])]}
    for name, _ in tf.train.list_variables(ckpt):  # the book's load_gpt2_params_from_tf_ckpt
        parts = name.split("/")[1:]
        target = params["blocks"][int(parts[0][1:])] if parts[0].startswith("h") else params
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = tf.train.load_variable(ckpt, name).squeeze()
    model = model_class(config_from_hparams(settings))
    load_weights(model, params)
    return model


def _worker(kind: str, a: dict[str, Any]) -> dict[str, Any]:
    import torch

    # every import happens before the clock starts, as in the reference numbers
    from .book import load_weights_into_gpt
    from .convert import config_from_hparams
    from .hub import from_pretrained, open_hub
    from .model import GPTModel
    from .storage import storage_for

    if kind == "notebook":
        import tensorflow as tf
    if kind == "transformers":
        from transformers import GPT2LMHeadModel
    if a.get("spec"):
        register(ModelSpec(**a["spec"]))
    dtype = getattr(torch, reference_dtype(a["dtype"]))  # the references' (transformers, the notebook path)
    # the full garbage collection that importing torch leaves due is import time too: without this it falls inside
    # or outside the timed load depending on how many objects the code before the clock happened to allocate
    gc.collect()
    _reset_peak_rss()
    rss0, t0 = _rss_mib(), time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "ours":
        model = from_pretrained(a["model"], device=a["device"], dtype=a["dtype"], progress=False)
        out["load_s"] = time.perf_counter() - t0
        _first_logits(model, a["device"])
    elif kind == "transformers":
        model = GPT2LMHeadModel.from_pretrained(a["folder"], dtype=dtype).to(a["device"]).eval()
        out["load_s"] = time.perf_counter() - t0
        _first_logits(model, a["device"], hf=True)
    elif kind == "notebook":
        model = _notebook_model(tf, Path(a["folder"]), GPTModel, config_from_hparams, load_weights_into_gpt)
        model = model.to(a["device"], dtype).eval()
        out["load_s"] = time.perf_counter() - t0
        _first_logits(model, a["device"])
    elif kind == "cold":  # download_s includes what is checked or converted while the bytes arrive
        hub, store = open_hub(a["model"], progress=False), storage_for(dtype_name(a["dtype"]))
        hub.weights(store)
        t2, stages = time.perf_counter(), dict(hub.stages)
        model = hub.load(store, torch.device(a["device"]))
        out.update(download_s=stages["fetch"], convert_s=stages["prepare"], load_s=time.perf_counter() - t2)
        _first_logits(model, a["device"])
    elif kind == "copy":  # the floor: the same bytes fetched from the same server into files
        dest = Path(a["dest"])
        dest.mkdir(parents=True, exist_ok=True)
        for name in OPENAI_FILES:
            with urllib.request.urlopen(f"{a['url']}/{a['size']}/{name}") as r, open(dest / name, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
    if a["device"].startswith("cuda"):
        torch.cuda.synchronize()
    out["total_s"] = time.perf_counter() - t0
    out["peak_rss_delta_mib"] = _rss_mib("VmHWM") - rss0
    return out


# -- generation in this process ------------------------------------------------------------------------------------------
class Marks:
    """Points in time during a device's work: perf_counter on CPU; on CUDA, events in the stream, read after one
    synchronize at the end (so marking never stalls the device)."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
        self.points: list[Any] = []
        self()

    def __call__(self) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append(event)
        else:
            self.points.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Each mark's time since the first (the start)."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return [self.points[0].elapsed_time(p) / 1000 for p in self.points]
        return [p - self.points[0] for p in self.points]


# run(idx, n, mark) generates n tokens after idx, calls mark() as each new column arrives, returns the columns produced
Runner = Callable[[Any, int, Callable[[], None]], int]


def ours_runner(model: Any, decode: str) -> Runner:
    """gpt2hub's generate_stream, greedy: one mark per column yielded."""
    from .generate import generate_stream

    def run(idx: Any, n: int, mark: Callable[[], None]) -> int:
        produced = 0
        for _ in generate_stream(model, idx, n, decode=decode):
            mark()
            produced += 1
        return produced

    return run


def transformers_runner(hf: Any) -> Runner:
    """transformers' greedy `generate` with a streamer that marks each new column (its first put is the prompt)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Marker(BaseStreamer):
        def __init__(self, mark: Callable[[], None]):
            self.mark, self.prompt_seen = mark, False

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                self.mark()
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def run(idx: Any, n: int, mark: Callable[[], None]) -> int:
        out = hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                          attention_mask=torch.ones_like(idx), streamer=Marker(mark))
        return int(out.shape[1] - idx.shape[1])

    return run


def time_run(run: Runner, idx: Any, n: int, device: str) -> dict[str, float]:
    """One timed generation: seconds to the first token, seconds of the steps after it (timed directly, from the first
    column's arrival to the last's), and the columns produced (the fewer of those counted and those marked)."""
    marks = Marks(device)
    produced = run(idx, n, marks)
    t = marks.seconds()
    return {"ttft_s": t[1] if len(t) > 1 else math.nan, "decode_s": t[-1] - t[1] if len(t) > 1 else math.nan,
            "produced": min(produced, len(t) - 1)}


def _generation(cfg: BenchConfig, ours: Any, hf: Any | None, device: str, where: str, floor: Floor,
                tick: Callable[[str, int, int], None]) -> list[dict[str, Any]]:
    import torch

    from .generate import _StaticDecoder
    from .model import KVCache

    decodes = ["cuda_graph", "eager"] if device.startswith("cuda") else ["eager"]
    impls = {f"gpt2hub ({d})": ours_runner(ours, d) for d in decodes}
    read = dict.fromkeys(impls, model_bytes(ours))  # the weight bytes each implementation reads per step
    if hf is not None:
        impls["transformers"], read["transformers"] = transformers_runner(hf), model_bytes(hf)
    rows = []
    vocab = ours.cfg["vocab_size"]
    for batch in cfg.batch_sizes:
        for prompt in cfg.prompt_lengths:
            idx = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
            for name, run in impls.items():
                run(idx, 2, lambda: None)  # warm-up
                runs = []
                for _ in range(cfg.repeats):
                    runs.append(time_run(run, idx, cfg.new_tokens, device))
                    tick(name, batch, prompt)
                row = {"impl": name, "batch": batch, "prompt": prompt, "new_tokens": cfg.new_tokens,
                       "weight_bytes": read[name], "produced": [r["produced"] for r in runs],
                       "ttft_s": stats([r["ttft_s"] for r in runs]), "decode_s": stats([r["decode_s"] for r in runs])}
                check_generation(f"{where}, {name}, batch {batch}, prompt {prompt}", row, floor)
                # decode rate: the tokens after the first over the time they took, each run timed on its own
                row["tokens_per_s"] = stats([batch * (cfg.new_tokens - 1) / r["decode_s"] for r in runs])
                rows.append(row)
            if device.startswith("cuda"):
                capture = []
                for _ in range(cfg.repeats):
                    cache = KVCache(ours.cfg, batch, ours.cfg["context_length"], ours.attention_dtype, device)
                    capture.append(_timed(functools.partial(_StaticDecoder, ours, cache, batch, graph=True), device))
                rows[-len(impls)]["graph_capture_s"] = stats(capture)
    return rows


def _timed(fn: Callable[[], Any], device: str) -> float:
    marks = Marks(device)
    fn()
    marks()
    return marks.seconds()[-1]


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes read plus written per second by the fastest of five copies of a buffer of `nbytes` (the weights' size,
    so that caches help it as much as they help reading the weights)."""
    import torch

    src = torch.ones(max(nbytes, 1 << 20) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(5))
    return 2 * src.numel() * 4 / best


# -- what a measurement may not be ----------------------------------------------------------------------------------------
class MeasurementError(GPT2HubError):
    """A timing that cannot be right (fewer tokens than asked, faster than memory allows, below the timer's resolution).

    The benchmark reports it naming the run, never as a number.
    """


GENEROUS = 4.0  # a step may read the weights up to this many times faster than the measured copy bandwidth suggests


@dataclass(frozen=True)
class Floor:
    """The least time a decoding step (or a first token) can take: every weight read once from memory, at GENEROUS
    times the copy bandwidth measured in the same run (None where unknown), and never less than the timer resolves."""

    weight_bytes: int
    bandwidth: float | None
    resolution: float

    @property
    def step_s(self) -> float:
        if self.bandwidth:
            return max(self.weight_bytes / (GENEROUS * self.bandwidth), self.resolution)
        return self.resolution

    def why(self) -> str:
        if not self.bandwidth:
            return f"the timer's resolution ({self.resolution:.1e} s)"
        return (f"{self.step_s * 1e3:.3g} ms to read the {self.weight_bytes / 2**20:.0f} MiB of weights once at "
                f"{GENEROUS:g}x the {self.bandwidth / 1e9:.1f} GB/s copy bandwidth measured in the same run")


def timer_resolution(device: str) -> float:
    """Seconds the clock can tell apart: perf_counter's on CPU; CUDA events resolve about half a microsecond."""
    return max(time.get_clock_info("perf_counter").resolution, 1e-6 if device.startswith("cuda") else 0.0)


def check_generation(where: str, row: dict[str, Any], floor: Floor) -> None:
    """MeasurementError naming the run for a run that produced fewer tokens than asked, or whose first token or
    decoding steps took less time than `floor` allows. `row` holds per-run lists (`produced`) or stats (`runs`)."""
    n, batch = row["new_tokens"], row["batch"]
    ttfts = row["ttft_s"]["runs"]
    steps = ([d / (n - 1) for d in row["decode_s"]["runs"]] if "decode_s" in row
             else [batch / t if t > 0 else 0.0 for t in row["tokens_per_s"]["runs"]])  # results written before decode_s
    produced = row.get("produced") or [n] * len(ttfts)
    for i, (made, ttft, step) in enumerate(zip(produced, ttfts, steps, strict=True), start=1):
        run = f"{where}, run {i} of {len(ttfts)}"
        if made < n:
            raise MeasurementError(f"{run}: produced {made} of the {n} tokens asked, so its rate would be a false "
                                   "number; the implementation stopped early or its output was not counted")
        for what, seconds in (("its first token", ttft), ("a decoding step", step)):
            if not seconds >= floor.step_s:  # NaN fails too
                raise MeasurementError(f"{run}: {what} took {seconds:.3g} s, below the physical floor of "
                                       f"{floor.step_s:.3g} s ({floor.why()}): a timing error, not a result")


def check_run(where: str, r: dict[str, Any]) -> None:
    """check_generation on every generation row of one device and dtype (`r`, as results.json holds it), against the
    floor of the weights each row's implementation reads and the run's copy bandwidth; and every load time positive."""
    for g in r.get("generation", []):
        weight_bytes = _read_per_step(r, g)
        floor = Floor(weight_bytes, r.get("copy_bandwidth_bytes_per_s") if weight_bytes else None,
                      timer_resolution(r["device"]))
        check_generation(f"{where}, {g['impl']}, batch {g['batch']}, prompt {g['prompt']}", g, floor)
    for kind, measured in r["load"].items():
        for key, st in measured.items():
            if key.endswith("_s") and not min(st["runs"]) > 0:
                raise MeasurementError(f"{where}, {kind} load: {key} of {min(st['runs'])} s is no time at all")


def _read_per_step(r: dict[str, Any], g: dict[str, Any]) -> int:
    """The weight bytes generation row `g` of run `r` reads per decoding step: its implementation's own (transformers
    beside an int8 model holds bfloat16 weights), or, in results written before rows carried them, the run's."""
    return int(g.get("weight_bytes", r.get("weight_bytes", 0)))


def check_results(res: dict[str, Any]) -> None:
    """check_run on every device and dtype of a results.json."""
    for r in res["runs"]:
        check_run(f"{machine_label(res['machine'])}, {r['device']} {r['dtype']}", r)


# -- the plan, its estimate and the progress bar -------------------------------------------------------------------------
# Seconds on a 2-core AMD EPYC (Zen 4) with little other work, measured with gpt2-small (GIB_SMALL of float32
# weights); the weight-bound parts scale with the model's bytes. A rough guide, said to be one: other work on the
# machine stretches every step (2-3x was seen), and the bar's ETA corrects itself as steps finish.
GIB_SMALL = 124_439_808 * 4 / 2**30
COST = {"python": 1.8, "load": 0.3, "transformers": 3.2, "tensorflow": 6.0, "notebook": 2.6, "cold": 2.5,
        "write": 3.4}
# greedy generation: seconds per call, per decoding step (batch 1, scaled by the weights and by 1 + batch/16), per
# token of context in the batch (attention), and per prompt token of prefill
GEN_COST = {"gpt2hub": {"call": 0.005, "step": 0.032, "context": 2e-6, "prefill": 0.0011},
            "transformers": {"call": 0.05, "step": 0.038, "context": 4e-5, "prefill": 0.0013}}

# int8 and int4, beside those: seconds to quantize gpt2-small's weights into the cache (once per fresh cache: the
# models' load and every cold load; 1.2 s and 5.6 s measured at a load average of 2.7, and 10x that seen at 5: rough),
# and gpt2hub's decoding step over float32's (decode_step.md: 80.5 and 147.7 tok/s against 29.4 at batch 1)
QUANT_COST = {"int8": {"quantize": 1.5, "step": 0.37}, "int4": {"quantize": 6.0, "step": 0.2}}


def _generation_seconds(impl: str, batch: int, prompt: int, new_tokens: int, scale: float,
                        dtype: str = "float32") -> float:
    """One timed generation (prefill, then new_tokens - 1 steps), as GEN_COST estimates it."""
    c = GEN_COST["transformers" if impl == "transformers" else "gpt2hub"]
    faster = 1.0 if impl == "transformers" else QUANT_COST.get(dtype, {}).get("step", 1.0)
    step = c["step"] * scale * faster * (1 + batch / 16) + c["context"] * batch * (prompt + new_tokens / 2)
    return c["call"] + c["prefill"] * scale * batch * prompt + new_tokens * step


@dataclass
class Plan:
    """The steps a run will take, each with an estimate in seconds; one bar over them whose unit is estimated
    seconds, so that its ETA is a time from the first step on. `record()` says how each kind of step went."""

    steps: dict[str, tuple[str, int, float]] = field(default_factory=dict)  # kind -> (what, count, seconds each)
    groups: dict[str, str] = field(default_factory=dict)  # kind -> the line that says it with the others of its group
    bar: Any = None
    done_count: dict[str, int] = field(default_factory=dict)
    took: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.perf_counter)

    def add(self, kind: str, what: str, count: int, seconds: float, group: str | None = None) -> None:
        if count:
            self.steps[kind] = (what, count, seconds)
            if group:
                self.groups[kind] = group

    @property
    def seconds(self) -> float:
        return sum(count * each for _, count, each in self.steps.values())

    def lines(self) -> list[str]:
        """One line per kind of step, or per group of kinds: how many, what, and the time they are expected to take."""
        said: dict[str, list[float]] = {}  # line -> [steps, seconds]
        for kind, (what, count, each) in self.steps.items():
            line = self.groups.get(kind, what)
            got = said.setdefault(line, [0, 0.0])
            got[0] += count
            got[1] += count * each
        return [f"  {int(n):3d} x {line}: ~{_duration(t)}" for line, (n, t) in said.items()]

    def done(self, kind: str) -> None:
        """One step of `kind` finished: the bar moves by its estimate; its time is kept for `record()`."""
        now = time.perf_counter()
        self.took[kind] = self.took.get(kind, 0.0) + now - self.last
        self.done_count[kind] = self.done_count.get(kind, 0) + 1
        self.last = now
        if self.bar is not None:  # never past the total (sums of floats in another order may differ in the last bit)
            self.bar.update(max(0.0, min(self.steps[kind][2], self.bar.total - self.bar.n)))

    def record(self) -> dict[str, dict[str, Any]]:
        """kind -> what, steps planned and done, seconds estimated and taken (in all)."""
        return {kind: {"what": what, "planned": count, "done": self.done_count.get(kind, 0),
                       "estimate_s": round(count * each, 2), "took_s": round(self.took.get(kind, 0.0), 2)}
                for kind, (what, count, each) in self.steps.items()}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def plan(cfg: BenchConfig, spec: ModelSpec, have_hf: bool, have_tf: bool, synthetic: bool) -> Plan:
    """What `run(cfg)` will do, step by step, with the time each step is expected to take (`have_hf`, `have_tf`:
    whether transformers and TensorFlow are installed)."""
    have_hf, have_tf = have_hf and cfg.transformers, have_tf and cfg.notebook
    scale = spec.n_params * 4 / 2**30 / GIB_SMALL
    p, c = Plan(), COST
    fresh = c["python"] + c["load"] * scale  # a fresh process: interpreter, torch, gpt2hub, a warm load
    p.add("write", "writing the weights: random ones in OpenAI's layout, a copy in transformers'", int(synthetic or have_hf),
          c["write"] * scale * (0.6 * synthetic + 0.4 * have_hf))
    for device in cfg.devices:
        for dtype in cfg.dtypes:
            at, name, ref = f"{device} {dtype}", dtype_name(dtype), reference_dtype(dtype)
            quantize = QUANT_COST.get(name, {}).get("quantize", 0.0) * scale
            ref_at = "" if ref == name else f" (at {ref}: it has no {name})"
            colds = cfg.loads if cfg.cold and not cfg.real_cache else 0
            p.add(f"cold {at}", f"cold load and copy of the same bytes, {at}", colds,
                  2 * c["python"] + c["cold"] * scale + quantize)
            p.add(f"models {at}", f"loading the models for generation in this process, {at}", 1,
                  c["load"] * scale * (1 + have_hf) + c["transformers"] * have_hf + quantize)
            p.add(f"warm ours {at}", f"warm load by gpt2hub in a fresh process, {at}", cfg.loads, fresh)
            p.add(f"warm transformers {at}", f"warm load by transformers{ref_at} in a fresh process, {at}",
                  cfg.loads * have_hf, fresh + c["transformers"])
            p.add(f"warm notebook {at}", f"warm load by the notebook path (TensorFlow){ref_at} in a fresh process, "
                  f"{at}", cfg.loads * have_tf, c["python"] + c["tensorflow"] + c["notebook"] * scale)
            impls = (["gpt2hub (cuda_graph)"] if device.startswith("cuda") else []) + ["gpt2hub (eager)"]
            impls += ["transformers"] * have_hf
            group = (f"generation timings ({', '.join(impls)}; batch {' '.join(map(str, cfg.batch_sizes))}; prompt "
                     f"{' '.join(map(str, cfg.prompt_lengths))}; {cfg.new_tokens} new tokens), {at}")
            for impl in impls:
                for batch in cfg.batch_sizes:
                    for prompt in cfg.prompt_lengths:
                        each = _generation_seconds(impl, batch, prompt, cfg.new_tokens, scale, name)
                        warm_up = _generation_seconds(impl, batch, prompt, 2, scale, name) / cfg.repeats
                        p.add(f"gen {at} {impl} {batch} {prompt}", f"generation, {impl}, batch {batch}, prompt "
                              f"{prompt}, {cfg.new_tokens} new tokens, {at}", cfg.repeats, each + warm_up, group)
    return p


# -- the whole run ------------------------------------------------------------------------------------------------------
def _cold_loads(repeats: int, base: dict[str, Any], env: dict[str, str], url: str, work: Path,
                size: str, done: Callable[[], None]) -> dict[str, Any]:
    """Cold loads and copies of the same bytes, alternating, each in a fresh process after a flush of the disk."""
    colds, copies = [], []
    for i in range(repeats):
        cold_env = {**env, "GPT2HUB_CACHE": str(work / f"cold-{i}"), "GPT2HUB_OPENAI_URL": url}
        _settle()
        colds.append(_in_subprocess("cold", base, cold_env))
        shutil.rmtree(work / f"cold-{i}", ignore_errors=True)
        _settle()
        copies.append(_in_subprocess("copy", {**base, "url": url, "size": size, "dest": str(work / "copy")}, env))
        shutil.rmtree(work / "copy", ignore_errors=True)
        done()
    return {"cold": {k: stats([c[k] for c in colds]) for k in colds[0]},
            "copy": {k: stats([c[k] for c in copies]) for k in copies[0]}}


def _generation_models(name: str, device: str, dtype: str, env: dict[str, str], hf_folder: Path | None) -> tuple:
    """gpt2hub's model (filling the cache the warm loads use from the server), and transformers' on the same weights
    (None without it), in this process."""
    import torch

    from .hub import from_pretrained

    with _env(env):
        ours = from_pretrained(name, device=device, dtype=dtype, progress=False)
    hf = None
    if hf_folder:
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its bar would cut into the benchmark's
        try:
            hf = GPT2LMHeadModel.from_pretrained(str(hf_folder), dtype=getattr(torch, reference_dtype(dtype)))
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        # transformers types its `to` through functools.wraps, whose signature keeps `self` unbound
        hf = hf.to(device).eval()  # type: ignore[arg-type]
    return ours, hf


@dataclass
class _Setup:
    """What every measurement of a run shares: the weights, where they are served, the environment of the loads."""

    spec: ModelSpec  # the spec loaded (a synthetic stand-in's, or the real one's)
    folder: Path  # OpenAI's seven files
    hf_folder: Path | None  # the same weights for transformers (None: transformers not timed)
    have_tf: bool  # time the notebook path
    env: dict[str, str]
    url: str  # the loopback server's
    work: Path
    spec_arg: dict[str, Any] | None  # the synthetic spec, registered again in each fresh process


def _measure(cfg: BenchConfig, p: Plan, setup: _Setup, device: str, dtype: str, where: str) -> dict[str, Any]:
    """Every measurement of one device and dtype: cold loads, warm loads in fresh processes, generation."""
    env, url, spec, work = setup.env, setup.url, setup.spec, setup.work
    at = f"{device} {dtype}"
    base = {"model": spec.name, "device": device, "dtype": dtype, "spec": setup.spec_arg}
    entry: dict[str, Any] = {"device": device, "dtype": dtype, "load": {}}
    if cfg.cold and not cfg.real_cache:
        entry["load"].update(_cold_loads(cfg.loads, base, env, url, work, spec.size, lambda: p.done(f"cold {at}")))
    ours, hf = _generation_models(spec.name, device, dtype, {**env, "GPT2HUB_OPENAI_URL": url}, setup.hf_folder)
    p.done(f"models {at}")
    kinds = {"ours": base}
    if setup.hf_folder:
        kinds["transformers"] = {**base, "folder": str(setup.hf_folder)}
    if setup.have_tf:
        kinds["notebook"] = {**base, "folder": str(setup.folder)}
    for kind, args in kinds.items():
        samples = []
        for _ in range(cfg.loads):
            samples.append(_in_subprocess(kind, args, {**env, "GPT2HUB_OFFLINE": "1"}))
            p.done(f"warm {kind} {at}")
        entry["load"][kind] = {k: stats([s[k] for s in samples]) for k in samples[0]}
    entry["weight_bytes"] = model_bytes(ours)  # int8/int4: the codes and scales, and the bfloat16 rest
    entry["reference_dtype"] = reference_dtype(dtype)  # transformers' and the notebook path's
    # the floor's bandwidth: the best copy of the weights' size, before and after the generation timings (so that a
    # moment of contention in one of them cannot make it stingy); each run's token count and the timer's resolution
    # are checked as it is measured
    bandwidth = copy_bandwidth(device, entry["weight_bytes"])
    entry["generation"] = _generation(cfg, ours, hf, device, where, Floor(0, None, timer_resolution(device)),
                                      lambda impl, b, n: p.done(f"gen {at} {impl} {b} {n}"))
    entry["copy_bandwidth_bytes_per_s"] = max(bandwidth, copy_bandwidth(device, entry["weight_bytes"]))
    check_run(where, entry)
    return entry


class _OwnFiles(logging.Filter):
    """Drops gpt2hub's warnings about the benchmark's own random-weight files (they stand in for the pinned
    published files under GPT2HUB_IGNORE_PINS=1, so each download and load warns), counting them. Such a warning
    names a file in the benchmark's folder or a URL of its loopback server."""

    def __init__(self, *places: str):
        super().__init__()
        self.places, self.dropped = list(places), 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "GPT2HUB_IGNORE_PINS" in message and any(place in message for place in self.places):
            self.dropped += 1
            return False
        return True


def run(cfg: BenchConfig, out: Path, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure everything `cfg` asks for; write results.json, results.md and plots into `out`; return the results.

    The plan and its estimated time are said (on stderr, or through `say`) before anything starts.
    """
    from tqdm.auto import tqdm

    from .download import progress_disabled

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    have_hf = cfg.transformers and _importable("transformers")
    have_tf = cfg.notebook and _importable("tensorflow")
    asked = resolve(cfg.model)
    real = _real_weights(asked) is not None
    p = plan(cfg, asked, have_hf, have_tf, synthetic=not real)
    say(f"gpt2hub bench: {asked.name} ({'your cached weights' if real else 'random weights'}, "
        f"{asked.n_params * 4 / 2**20:.0f} MiB in float32) on {', '.join(cfg.devices)} in {', '.join(cfg.dtypes)}; "
        f"{cfg.loads} timing(s) of each load, {cfg.repeats} of each generation:")
    for line in p.lines():
        say(line)
    say(f"estimated time: about {_duration(p.seconds)} on a quiet 2-core CPU like the one the estimate was measured on "
        "(longer where other work shares the machine)" + ("" if cfg.quick else "; `gpt2hub bench --quick` takes ~30 s there"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpt2hub-bench-"))
    own = _OwnFiles(str(work))
    logging.getLogger("gpt2hub").addFilter(own)
    results: dict[str, Any] = {"machine": machine_info(), "config": asdict(cfg), "runs": []}
    try:
        with tqdm(total=p.seconds, desc="benchmarking", unit="s", disable=progress_disabled(),
                  bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} estimated s [{elapsed}<{remaining}]") as p.bar:
            p.last = time.perf_counter()
            results.update(_run_all(cfg, p, asked, work, have_hf, have_tf, machine_label(results["machine"]), own))
        results["plan"] = p.record()
    finally:
        logging.getLogger("gpt2hub").removeFilter(own)
        shutil.rmtree(work, ignore_errors=True)
    if own.dropped:
        say(f"({own.dropped} warning(s) about the benchmark's own random-weight files, which stand in for the "
            "published ones under GPT2HUB_IGNORE_PINS=1, not shown)")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown([results]))
    if cfg.plots:
        plot([results], out)
    return results


def _run_all(cfg: BenchConfig, p: Plan, asked: ModelSpec, work: Path, have_hf: bool, have_tf: bool,
             label: str, own: _OwnFiles) -> dict[str, Any]:
    spec, root, origin = prepare(asked, work, cfg.real_cache)
    folder = root / spec.size
    hf_folder = write_hf_copy(spec, folder, work / "hf") if have_hf else None
    if origin == "synthetic" or hf_folder:
        p.done("write")
    env = {"GPT2HUB_DISABLE_PROGRESS_BARS": "1"}
    if origin == "synthetic":  # random weights under the published names: the pinned hashes must not apply
        env["GPT2HUB_IGNORE_PINS"] = "1"
    if not cfg.real_cache:
        env["GPT2HUB_CACHE"] = str(work / "cache")
    runs = []
    with serve(root) as url:
        own.places.append(url)
        setup = _Setup(spec, folder, hf_folder, have_tf, env, url, work, asdict(spec) if origin == "synthetic" else None)
        for device in cfg.devices:
            for dtype in cfg.dtypes:
                runs.append(_measure(cfg, p, setup, device, dtype, f"{label}, {device} {dtype}"))
                gc.collect()
    return {"model": asked.name, "weights": origin, "runs": runs}


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# -- reports ------------------------------------------------------------------------------------------------------------
def _med(d: dict[str, Any] | None, key: str) -> float | None:
    return d[key]["median"] if d and key in d else None


def _spread(st: dict[str, Any] | None, fmt: Callable[[float], str]) -> str:
    """"median (min-max)" of a stats dict; the median alone for a single run; "-" for none."""
    if not st:
        return "-"
    if len(st.get("runs", [])) < 2:
        return fmt(st["median"])
    return f"{fmt(st['median'])} ({fmt(st['min'])}-{fmt(st['max'])})"


def _seconds(st: dict[str, Any] | None) -> str:
    text = _spread(st, lambda v: f"{v:.3f}")
    return text if text == "-" else text + " s"


def _at_reference(r: dict[str, Any], text: str) -> str:
    """`text` (a cell or an implementation of the references) with the dtype they ran at where it is not the row's
    (int8 and int4 rows: transformers and the notebook path have no such weights)."""
    ref = r.get("reference_dtype", r["dtype"])
    return text if ref == r["dtype"] or text == "-" else f"{text} at {ref}"


def _impl(r: dict[str, Any], impl: str) -> str:
    return _at_reference(r, impl) if impl == "transformers" else impl


def _load_row(res: dict[str, Any], r: dict[str, Any]) -> str:
    ld = r["load"]
    ours, hf = _med(ld.get("ours"), "total_s"), _med(ld.get("transformers"), "total_s")
    cold = ld.get("cold") or {}
    rss = (ld.get("ours") or {}).get("peak_rss_delta_mib")
    cells = [machine_label(res["machine"]), f"{res['model']} ({res['weights']})", r["device"], r["dtype"],
             _seconds((ld.get("ours") or {}).get("total_s")),
             _at_reference(r, _seconds((ld.get("transformers") or {}).get("total_s"))),
             f"{hf / ours:.2f}x" if ours and hf else "-",
             _at_reference(r, _seconds((ld.get("notebook") or {}).get("total_s"))),
             *(_seconds(cold.get(k)) for k in ("download_s", "convert_s", "load_s")),
             _seconds((ld.get("copy") or {}).get("total_s")), _spread(rss, lambda v: f"{v:.0f}") + " MiB" if rss else "-"]
    return "| " + " | ".join(cells) + " |"


def _generation_row(res: dict[str, Any], r: dict[str, Any], g: dict[str, Any], ref: dict[tuple, Any]) -> str:
    tps = g["tokens_per_s"]["median"]
    other = ref.get((g["batch"], g["prompt"]))
    vs = f"{tps / other['tokens_per_s']['median']:.2f}x" if other and g["impl"] != "transformers" else ""
    # weight bytes read per decoding step times steps per second, over the copy bandwidth measured in the same run
    copy_bw = r.get("copy_bandwidth_bytes_per_s")
    bw = f"{_read_per_step(r, g) * tps / g['batch'] / copy_bw:.0%}" if copy_bw else ""
    return (f"| {machine_label(res['machine'])} | {r['device']} | {r['dtype']} | {_impl(r, g['impl'])} | {g['batch']} | "
            f"{g['prompt']} | {_spread(g['tokens_per_s'], lambda v: f'{v:,.1f}')} | "
            f"{_spread(g['ttft_s'], lambda v: f'{v * 1000:.1f}')} ms | {vs} | {bw} |")


def markdown(all_results: list[dict[str, Any]]) -> str:
    """Tables a person can paste into an issue: loads per stage, then generation, one row per machine and setting,
    each median with its spread (min-max) over the runs. Every measurement is checked first (`check_results`):
    an impossible one is a MeasurementError naming the run, never a number in a table."""
    for res in all_results:
        check_results(res)
    lines = ["### Load (seconds to the first logits, fresh processes: median (min-max))", "",
             "| machine | weights | device | dtype | gpt2hub warm | transformers warm | ratio | notebook path | "
             "cold: download | convert | load | copy floor | peak RSS delta |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [_load_row(res, r) for res in all_results for r in res["runs"]]
    lines += ["", "### Generation (greedy; tokens/s over the batch, timed from the first new token to the last: "
              "median (min-max))", "",
              "| machine | device | dtype | impl | batch | prompt | tokens/s | first token | vs transformers | "
              "bandwidth used |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in all_results:
        for r in res["runs"]:
            ref = {(g["batch"], g["prompt"]): g for g in r["generation"] if g["impl"] == "transformers"}
            lines += [_generation_row(res, r, g, ref) for g in r["generation"]]
    refs = sorted({(r["dtype"], r["reference_dtype"]) for res in all_results for r in res["runs"]
                   if r.get("reference_dtype", r["dtype"]) != r["dtype"]})
    if refs:
        lines += ["", f"{' and '.join(d for d, _ in refs)}: transformers and the notebook path have no such weights, "
                  f"so beside them they ran at {', '.join(dict.fromkeys(ref for _, ref in refs))} (the quantized "
                  "models' activations), marked \"at\": their ratios weigh gpt2hub's quantized weights against "
                  "transformers' nearest, not the same arithmetic. \"bandwidth used\" counts the weight bytes each "
                  "implementation reads per step (quantized: codes and scales, and the embeddings and norms)."]
    return "\n".join(lines) + "\n"


def plot(all_results: list[dict[str, Any]], out: Path) -> list[Path]:
    """load_stages.png (seconds per stage) and tokens_per_s.png (tokens/s against batch size)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'gpt2hub[bench]')", file=sys.stderr)
        return []
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    return [_plot_loads(plt, all_results, out / "load_stages.png", plain, NullFormatter()),
            _plot_tokens(plt, all_results, out / "tokens_per_s.png", plain, NullFormatter(), FuncFormatter)]


def _plot_loads(plt: Any, all_results: list[dict[str, Any]], path: Path, plain: Any, no_label: Any) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    labels: list[str] = []
    series: dict[str, list[float | None]] = {"gpt2hub warm": [], "transformers warm": [], "notebook path": [], "gpt2hub cold": []}
    for res in all_results:
        for r in res["runs"]:
            labels.append(f"{machine_label(res['machine'])[:28]}\n{r['device']} {r['dtype']}")
            ld = r["load"]
            series["gpt2hub warm"].append(_med(ld.get("ours"), "total_s"))
            series["transformers warm"].append(_med(ld.get("transformers"), "total_s"))
            series["notebook path"].append(_med(ld.get("notebook"), "total_s"))
            series["gpt2hub cold"].append(_med(ld.get("cold"), "total_s"))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=name)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(no_label)
    ax.set_ylabel("seconds until the first logits (log scale)")
    ax.set_title("Loading GPT-2: warm and cold, against transformers and the notebook path")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_tokens(plt: Any, all_results: list[dict[str, Any]], path: Path, plain: Any, no_label: Any,
                 formatter: Any) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for res in all_results:
        for r in res["runs"]:
            prompt = min(g["prompt"] for g in r["generation"])
            for impl in dict.fromkeys(g["impl"] for g in r["generation"]):
                pts = sorted((g["batch"], g["tokens_per_s"]["median"]) for g in r["generation"]
                             if g["impl"] == impl and g["prompt"] == prompt)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{machine_label(res['machine'])[:24]} {r['device']} {r['dtype']}: {_impl(r, impl)}")
    batches = sorted({g["batch"] for res in all_results for r in res["runs"] for g in r["generation"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_formatter(no_label)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(formatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.set_xlabel("batch size (sequences)")
    ax.set_ylabel("generated tokens per second (log scale)")
    ax.set_title(f"Greedy generation, {all_results[0]['model']}, shortest prompt")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def compare(files: list[Path], out: Path) -> str:
    """One table and one pair of plots from results.json files of several machines."""
    all_results = [json.loads(Path(f).read_text()) for f in files]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(all_results)
    (out / "compare.md").write_text(table)
    plot(all_results, out)
    return table


if __name__ == "__main__":  # a measurement in a fresh process: python -m gpt2hub.bench KIND JSON
    print(json.dumps(_worker(sys.argv[1], json.loads(sys.argv[2]))))
