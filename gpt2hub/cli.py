"""The `gpt2hub` command: download, generate, and look after the cache."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .__version__ import __version__
from .cache import cached_models, default_root, model_cache, prune
from .errors import GPT2HubError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_download(args: argparse.Namespace) -> int:
    from .hub import download_files

    paths = download_files(args.name, source=args.source, force_download=args.force)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import stream_text
    from .hub import from_pretrained, load_tokenizer

    model = from_pretrained(args.model, device=args.device, dtype=args.dtype, source=args.source)
    tokenizer = load_tokenizer(args.model, source=args.source)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for piece in stream_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, generator=generator):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    """Write cached models in OpenAI's layout (with SHA256SUMS) into a folder other machines can download from."""
    from .mirror import SUMS, write_mirror

    written = write_mirror(args.folder, args.names or None)
    for f in written:
        print(f"{f.how}\t{_human(f.size)}\t{f.path}")
    folder = Path(args.folder)
    print(f"wrote {len(written)} file(s) and {folder / SUMS}; serve it with `python -m http.server -d {folder} 8000` "
          "and set GPT2HUB_OPENAI_URL=http://THIS_HOST:8000 on the other machines")
    return 0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.is_dir() else 0


def cmd_cache_list(args: argparse.Namespace) -> int:
    root = default_root()
    models = cached_models(root)
    if not models:
        print(f"the cache at {root} is empty")
        return 0
    print(f"cache: {root}")
    print(f"{'source':8} {'model':8} {'files':>5} {'on disk':>10}  stored dtypes")
    for m in models:
        files = m.records()
        outside = sum(r["size"] for r in files.values() if "path" in r)  # hf files live in the HF cache
        note = f" (+{_human(outside)} in the Hugging Face cache)" if outside else ""
        dtypes = ", ".join(m.stored_dtypes()) or "-"
        print(f"{m.source:8} {m.size:8} {len(files):>5} {_human(_dir_bytes(m.dir)):>10}  {dtypes}{note}")
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    bad = 0
    for m in cached_models(default_root()):
        problems = m.verify()
        bad += len(problems)
        print(f"{m.source}/{m.size}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p}")
    if bad:
        print(f"{bad} missing or damaged file(s): the next load repairs them, or run `gpt2hub cache rm MODEL`",
              file=sys.stderr)
    return 1 if bad else 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from .registry import resolve

    spec = resolve(args.name)
    sources = [args.source] if args.source else ["openai", "hf"]
    removed = 0
    for source in sources:
        m = model_cache(default_root(), source, spec.size)
        if os.path.lexists(m.dir):
            with m.lock(f"removing {spec.name}", timeout=args.timeout):
                freed = m.remove_all()
            print(f"removed {m.dir} ({_human(freed)} freed)")
            removed += 1
    if not removed:
        print(f"{spec.name} is not in the cache at {default_root()}")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    freed = 0
    for p in prune(default_root()):
        freed += p.bytes
        print(f"{p.action} {p.path}" + (f": {p.why}" if p.why else "") + (" (stale lock)" if p.path.suffix == ".lock" else ""))
    print(f"freed {_human(freed)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import BenchConfig, compare, markdown, run
    from .errors import DeviceError

    out = Path(args.out)
    if args.bench_command == "compare":
        print(compare([Path(f) for f in args.files], out), end="")
        print(f"wrote {out / 'compare.md'} and plots in {out}")
        return 0
    import torch

    if any(d.startswith("cuda") for d in args.device) and not torch.cuda.is_available():
        raise DeviceError(f"--device cuda was asked for, but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                          "use --device cpu")
    cfg = BenchConfig(model=args.model, devices=args.device, dtypes=args.dtype, batch_sizes=args.batch_sizes,
                      prompt_lengths=args.prompt_lengths, new_tokens=args.new_tokens, repeats=args.repeats,
                      real_cache=args.real_cache, transformers=not args.no_transformers, notebook=not args.no_notebook,
                      plots=not args.no_plots)
    results = run(cfg, out)
    print(markdown([results]), end="")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'} and plots in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2hub", description="OpenAI's GPT-2 weights as PyTorch models, cached.")
    p.add_argument("--version", action="version", version=f"gpt2hub {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (locks, retries)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("download", help="fetch a model's published files into the cache")
    d.add_argument("name")
    d.add_argument("--source", default="openai", choices=["openai", "hf"])
    d.add_argument("--force", action="store_true", help="download again even if cached")
    d.set_defaults(func=cmd_download)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text")
    g.add_argument("prompt")
    g.add_argument("--model", default="gpt2-small")
    g.add_argument("--source", default="openai", choices=["openai", "hf"])
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="time loading and generation on this machine, beside transformers")
    b.add_argument("--model", default="gpt2-small")
    b.add_argument("--device", nargs="+", default=["cpu"], help="one or more devices, e.g. cpu cuda")
    b.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    b.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    b.add_argument("--prompt-lengths", nargs="+", type=int, default=[16, 512])
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--real-cache", action="store_true", help="use your cached real weights, skip the cold load")
    b.add_argument("--no-transformers", action="store_true", help="do not time transformers beside gpt2hub")
    b.add_argument("--no-notebook", action="store_true", help="do not time the notebook path (TensorFlow)")
    b.add_argument("--no-plots", action="store_true", help="write no PNG plots (make them later with `bench compare`)")
    b.add_argument("--out", default="gpt2hub-bench", help="folder for results.json, results.md and plots")
    bsub = b.add_subparsers(dest="bench_command")
    cmp_ = bsub.add_parser("compare", help="merge results.json files of several machines into one table and plot")
    cmp_.add_argument("files", nargs="+")
    cmp_.add_argument("--out", default="gpt2hub-compare")
    b.set_defaults(func=cmd_bench)

    mi = sub.add_parser("mirror", help="write cached models in OpenAI's layout, to serve to other machines")
    mi.add_argument("folder")
    mi.add_argument("names", nargs="*", help="models to mirror (default: every fully cached OpenAI model)")
    mi.set_defaults(func=cmd_mirror)

    c = sub.add_parser("cache", help="inspect and tidy the cache").add_subparsers(dest="cache_command", required=True)
    c.add_parser("list", help="models, files, bytes on disk, converted dtypes").set_defaults(func=cmd_cache_list)
    c.add_parser("verify", help="re-hash every file; exit 1 on damage").set_defaults(func=cmd_cache_verify)
    rm = c.add_parser("rm", help="delete a model from the cache")
    rm.add_argument("name")
    rm.add_argument("--source", choices=["openai", "hf"])
    rm.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a process using it")
    rm.set_defaults(func=cmd_cache_rm)
    c.add_parser("prune", help="delete partial downloads, temp files and stale locks").set_defaults(func=cmd_cache_prune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="gpt2hub: %(message)s")
    try:
        return args.func(args)
    except GPT2HubError as e:
        print(f"gpt2hub: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad arguments that reached the library (a dtype, a source)
        print(f"gpt2hub: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gpt2hub: interrupted; partial downloads are kept and resume on the next run", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
