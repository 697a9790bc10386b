"""`gpt2hub bench`: cold load, conversion, warm load, first token and generation, timed beside the references.

Loads are timed in fresh processes (imports excluded), generation in this process with the same weights and threads
for every implementation. Without a real checkpoint in the cache, a full-size one with random weights is generated
in OpenAI's layout and served from 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import http.server
import json
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
from .files import default_root
from .registry import OPENAI_FILES, ModelSpec, register, resolve


@dataclass
class BenchConfig:
    model: str = "gpt2-small"
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    prompt_lengths: list[int] = field(default_factory=lambda: [16, 512])
    new_tokens: int = 32
    repeats: int = 3
    real_cache: bool = False  # time warm loads and generation on the user's own cache; no cold load
    transformers: bool = True
    notebook: bool = True
    plots: bool = True


# -- the machine ------------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
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
    with contextlib.suppress(OSError, ValueError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
    return info


def machine_label(info: dict[str, Any]) -> str:
    return info.get("gpu") or f"{info['cpu']} ({info['cores']} cores)"


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# -- weights and a loopback server --------------------------------------------------------------------------------------
def _synthetic_spec(spec: ModelSpec) -> ModelSpec:
    """The same architecture under its own name and folder, with no pinned hashes (the weights are random)."""
    return register(replace(spec, name=f"{spec.name}-synthetic", size=f"{spec.size}-synthetic",
                            hf_repo=f"synthetic/{spec.name}-synthetic"))  # the pins stay: GPT2HUB_IGNORE_PINS=1


def prepare(spec: ModelSpec, work: Path, real_cache: bool) -> tuple[ModelSpec, Path, str]:
    """(spec to load, folder whose `{size}/` holds OpenAI's seven files, "real" or "synthetic")."""
    from .synthetic import write_openai_folder

    cached = Cache(default_root()).entry(EntryKey("openai", spec.size))
    root = work / "served"
    root.mkdir(parents=True, exist_ok=True)
    if all(cached.raw_path(n).exists() for n in OPENAI_FILES):
        (root / spec.size).symlink_to(cached.raw, target_is_directory=True)
        return spec, root, "real"
    if real_cache:
        raise SystemExit(f"--real-cache: {spec.name} is not fully cached in {cached.raw}; run `gpt2hub download "
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
    from .registry import dtype_name
    from .storage import storage_for

    if kind == "notebook":
        import tensorflow as tf
    if kind == "transformers":
        from transformers import GPT2LMHeadModel
    if a.get("spec"):
        register(ModelSpec(**a["spec"]))
    dtype = getattr(torch, a["dtype"])
    # the full garbage collection that importing torch leaves due is import time too: without this it falls inside
    # or outside the timed load depending on how many objects the code before the clock happened to allocate
    gc.collect()
    _reset_peak_rss()
    rss0, t0 = _rss_mib(), time.perf_counter()
    out: dict[str, Any] = {}
    if kind == "ours":
        model = from_pretrained(a["model"], device=a["device"], dtype=dtype, progress=False)
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
def _timed(fn: Callable[[], Any], device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _generation(cfg: BenchConfig, ours: Any, hf: Any | None, device: str, bar: Any) -> list[dict[str, Any]]:
    import torch

    from .generate import _StaticDecoder, generate
    from .model import KVCache

    impls: dict[str, Callable[[Any, int], Any]] = {}
    decodes = ["cuda_graph", "eager"] if device.startswith("cuda") else ["eager"]
    for decode in decodes:
        impls[f"gpt2hub ({decode})"] = functools.partial(lambda d, idx, n: generate(ours, idx, n, decode=d), decode)
    if hf is not None:
        impls["transformers"] = lambda idx, n: hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                           pad_token_id=0, attention_mask=torch.ones_like(idx))
    rows = []
    vocab = ours.cfg["vocab_size"]
    for batch in cfg.batch_sizes:
        for prompt in cfg.prompt_lengths:
            idx = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
            for name, run in impls.items():
                run(idx, 2)  # warm-up
                ttft = [_timed(functools.partial(run, idx, 1), device) for _ in range(cfg.repeats)]
                total = [_timed(functools.partial(run, idx, cfg.new_tokens), device) for _ in range(cfg.repeats)]
                # decode rate: the new tokens after the first, over the time after the first token
                tps = [batch * (cfg.new_tokens - 1) / max(t - statistics.median(ttft), 1e-9) for t in total]
                rows.append({"impl": name, "batch": batch, "prompt": prompt, "new_tokens": cfg.new_tokens,
                             "ttft_s": stats(ttft), "tokens_per_s": stats(tps)})
                bar.update(1)
            if device.startswith("cuda"):
                capture = []
                for _ in range(cfg.repeats):
                    cache = KVCache(ours.cfg, batch, ours.cfg["context_length"], ours.tok_emb.weight.dtype, device)
                    capture.append(_timed(functools.partial(_StaticDecoder, ours, cache, batch, graph=True), device))
                rows[-len(impls)]["graph_capture_s"] = stats(capture)
    return rows


def _copy_bandwidth(device: str) -> float:
    """Bytes read plus written per second by a large device-to-device copy (the ceiling decoding can approach)."""
    import torch

    src = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = [_timed(lambda: dst.copy_(src), device) for _ in range(5)]
    return 2 * src.numel() * 4 / statistics.median(times)


# -- the whole run ------------------------------------------------------------------------------------------------------
def _cold_loads(repeats: int, base: dict[str, Any], env: dict[str, str], url: str, work: Path,
                size: str) -> dict[str, Any]:
    """Cold loads and copies of the same bytes, alternating, each in a fresh process after a flush of the disk; then
    one load that fills the cache the warm loads use."""
    colds, copies = [], []
    for i in range(repeats):
        cold_env = {**env, "GPT2HUB_CACHE": str(work / f"cold-{i}"), "GPT2HUB_OPENAI_URL": url}
        _settle()
        colds.append(_in_subprocess("cold", base, cold_env))
        shutil.rmtree(work / f"cold-{i}", ignore_errors=True)
        _settle()
        copies.append(_in_subprocess("copy", {**base, "url": url, "size": size, "dest": str(work / "copy")}, env))
        shutil.rmtree(work / "copy", ignore_errors=True)
    _in_subprocess("ours", base, {**env, "GPT2HUB_OPENAI_URL": url})  # fills the warm cache
    return {"cold": {k: stats([c[k] for c in colds]) for k in colds[0]},
            "copy": {k: stats([c[k] for c in copies]) for k in copies[0]}}


def _generation_models(name: str, device: str, dtype: str, warm_env: dict[str, str], hf_folder: Path | None) -> tuple:
    """gpt2hub's model from the warm cache, and transformers' on the same weights (None without it), in this process."""
    import torch

    from .hub import from_pretrained

    with _env(warm_env):
        ours = from_pretrained(name, device=device, dtype=dtype, progress=False)
    hf = None
    if hf_folder:
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(str(hf_folder), dtype=getattr(torch, dtype))
        # transformers types its `to` through functools.wraps, whose signature keeps `self` unbound
        hf = hf.to(device).eval()  # type: ignore[arg-type]
    return ours, hf


def run(cfg: BenchConfig, out: Path) -> dict[str, Any]:
    from tqdm.auto import tqdm

    have_hf = cfg.transformers and _importable("transformers")
    have_tf = cfg.notebook and _importable("tensorflow")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpt2hub-bench-"))
    results: dict[str, Any] = {"machine": machine_info(), "config": asdict(cfg), "runs": []}
    try:
        asked = resolve(cfg.model)
        spec, root, origin = prepare(asked, work, cfg.real_cache)
        results.update(model=asked.name, weights=origin)
        folder = root / spec.size
        hf_folder = write_hf_copy(spec, folder, work / "hf") if have_hf else None
        env = {"GPT2HUB_DISABLE_PROGRESS_BARS": "1"}
        if origin == "synthetic":  # random weights under the published names: the pinned hashes must not apply
            env["GPT2HUB_IGNORE_PINS"] = "1"
        if not cfg.real_cache:
            env["GPT2HUB_CACHE"] = str(work / "cache")
        spec_arg = asdict(spec) if origin == "synthetic" else None
        per_device = 4 + cfg.repeats * (1 + have_hf + have_tf) + len(cfg.batch_sizes) * len(cfg.prompt_lengths) * (
            (2 if any(d.startswith("cuda") for d in cfg.devices) else 1) + have_hf)
        bar = tqdm(total=per_device * len(cfg.devices) * len(cfg.dtypes), desc="benchmarking", unit="step")
        with serve(root) as url, bar:
            for device in cfg.devices:
                for dtype in cfg.dtypes:
                    base = {"model": spec.name, "device": device, "dtype": dtype, "spec": spec_arg}
                    entry: dict[str, Any] = {"device": device, "dtype": dtype, "load": {}}
                    if not cfg.real_cache:
                        entry["load"].update(_cold_loads(cfg.repeats, base, env, url, work, spec.size))
                    bar.update(4)
                    warm_env = {**env, "GPT2HUB_OFFLINE": "1"}
                    kinds = {"ours": base}
                    if hf_folder:
                        kinds["transformers"] = {**base, "folder": str(hf_folder)}
                    if have_tf:
                        kinds["notebook"] = {**base, "folder": str(folder)}
                    for kind, args in kinds.items():
                        samples = []
                        for _ in range(cfg.repeats):
                            samples.append(_in_subprocess(kind, args, warm_env))
                            bar.update(1)
                        entry["load"][kind] = {k: stats([s[k] for s in samples]) for k in samples[0]}
                    ours, hf = _generation_models(spec.name, device, dtype, warm_env, hf_folder)
                    entry["generation"] = _generation(cfg, ours, hf, device, bar)
                    if device.startswith("cuda"):
                        entry["copy_bandwidth_bytes_per_s"] = _copy_bandwidth(device)
                    entry["weight_bytes"] = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied: once
                    results["runs"].append(entry)
                    del ours, hf
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown([results]))
    if cfg.plots:
        plot([results], out)
    return results


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
    import importlib.util

    return importlib.util.find_spec(name) is not None


# -- reports ------------------------------------------------------------------------------------------------------------
def _med(d: dict[str, Any] | None, key: str) -> float | None:
    return d[key]["median"] if d and key in d else None


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


def markdown(all_results: list[dict[str, Any]]) -> str:
    """Tables a person can paste into an issue: loads per stage, then generation, one row per machine and setting."""
    lines = ["### Load (median of fresh processes; first logits included)", "",
             "| machine | weights | device | dtype | gpt2hub warm | transformers warm | ratio | notebook path | "
             "cold: download | convert | load | copy floor | peak RSS delta |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in all_results:
        for r in res["runs"]:
            ld = r["load"]
            ours, hf = _med(ld.get("ours"), "total_s"), _med(ld.get("transformers"), "total_s")
            ratio = f"{hf / ours:.2f}x" if ours and hf else "-"
            cold = ld.get("cold")
            rss = _med(ld.get("ours"), "peak_rss_delta_mib")
            cells = [machine_label(res["machine"]), f"{res['model']} ({res['weights']})", r["device"], r["dtype"],
                     _fmt(ours), _fmt(hf), ratio, _fmt(_med(ld.get("notebook"), "total_s")),
                     *(_fmt(_med(cold, k)) for k in ("download_s", "convert_s", "load_s")),
                     _fmt(_med(ld.get("copy"), "total_s")), "-" if rss is None else f"{rss:.0f} MiB"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "### Generation (greedy; tokens/s over the batch after the first token; median)", "",
              "| machine | device | dtype | impl | batch | prompt | tokens/s | first token | vs transformers | "
              "bandwidth used |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in all_results:
        for r in res["runs"]:
            ref = {(g["batch"], g["prompt"]): g for g in r["generation"] if g["impl"] == "transformers"}
            for g in r["generation"]:
                tps = g["tokens_per_s"]["median"]
                other = ref.get((g["batch"], g["prompt"]))
                vs = f"{tps / other['tokens_per_s']['median']:.2f}x" if other and g["impl"] != "transformers" else ""
                # weight bytes read per decoding step times steps per second, over the measured copy bandwidth
                copy_bw = r.get("copy_bandwidth_bytes_per_s")
                bw = f"{r['weight_bytes'] * tps / g['batch'] / copy_bw:.0%}" if copy_bw else ""
                lines.append(f"| {machine_label(res['machine'])} | {r['device']} | {r['dtype']} | {g['impl']} | "
                             f"{g['batch']} | {g['prompt']} | {tps:,.1f} | {g['ttft_s']['median'] * 1000:.1f} ms | {vs} | "
                             f"{bw} |")
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
                        label=f"{machine_label(res['machine'])[:24]} {r['device']} {r['dtype']}: {impl}")
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
