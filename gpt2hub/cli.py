"""The `gpt2hub` command: it parses arguments, calls the library, and prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import logging
import math
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .__version__ import __version__
from .errors import GPT2HubError
from .registry import SOURCES, dtype_choices

log = logging.getLogger("gpt2hub")
# the dtypes and sources the commands accept, from the registry's tables
DTYPES, EXPORT_DTYPES = tuple(dtype_choices()), tuple(dtype_choices(exportable=True))


# argument types: each bad value is a one-line usage error naming the option, the value and the accepted range ------
def _number(kind: Callable[[str], Any], low: float, high: float | None, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {what}")
        return value

    return parse


TOKENS = _number(int, 0, 1_000_000, "a whole number of tokens from 0 to 1000000")
TEMPERATURE = _number(float, 0.0, 100.0, "a temperature from 0 (greedy) to 100")
TOP_K = _number(int, 0, 10**9, "a whole number >= 0 (0 turns top-k off)")
SEED = _number(int, 0, 2**63 - 1, "a seed from 0 to 2**63-1")
POSITIVE = _number(int, 1, 1_000_000, "a whole number from 1 to 1000000")
SECONDS = _number(float, 0.0, None, "a number of seconds >= 0")
PENALTY = _number(float, 0.01, 100.0, "a penalty from 0.01 to 100 (1 is off)")
POSITIVE_SMALL = _number(int, 1, 64, "a whole number from 1 to 64")
NEW_TOKENS = _number(int, 2, 1_000_000, "a whole number from 2 to 1000000 (the rate is timed after the first token)")


def TOP_P(text: str) -> float:  # noqa: N802 - an argparse type, named like the others
    value = _number(float, 0.0, 1.0, "a probability in (0, 1] (1 turns top-p off)")(text)
    if value == 0.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in (0, 1] (1 turns top-p off)")
    return value


def MODEL(text: str) -> str:  # noqa: N802
    if not text.strip() or len(text) > 4096:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}{'...' if len(text) > 40 else ''} is not a model name or folder "
                                         "(try gpt2-small, 355M or openai-community/gpt2-xl)")
    return text


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _when(t: float | None) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"


# commands ----------------------------------------------------------------------------------------------------------
def cmd_download(args: argparse.Namespace) -> int:
    from .files import default_root
    from .hub import download_files

    start = time.perf_counter()
    log.info("downloading %s (source %s%s) into the cache at %s", args.name, args.source,
             f", revision {args.revision}" if args.revision else "", args.cache_dir or default_root())
    paths = download_files(args.name, source=args.source, revision=args.revision, cache_dir=args.cache_dir,
                           force_download=args.force)
    for name, path in paths.items():
        log.info("%s: %s", name, _human(path.stat().st_size))
        print(f"{name}\t{path}")
    log.info("%d file(s), %s, ready in %.2f s", len(paths), _human(sum(p.stat().st_size for p in paths.values())),
             time.perf_counter() - start)
    return 0


def read_prompt(text: str) -> str:
    """The prompt: `text`, or for "-" standard input (one trailing newline, which a shell's echo adds, removed)."""
    if text != "-":
        return text
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    try:
        prompt = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"the prompt read from standard input is not UTF-8 text (byte {e.start}): "
                         "convert it, e.g. with iconv -t UTF-8") from None
    return prompt.removesuffix("\n").removesuffix("\r")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate_text, stream_text
    from .hub import from_pretrained, load_tokenizer

    prompt = read_prompt(args.prompt)
    if not prompt:
        raise ValueError("the prompt is empty: give some text to continue, e.g. gpt2hub generate \"Every effort\", "
                         "or - to read it from standard input")
    args.interrupted = f"interrupted while loading {args.model}; a partial download is kept and resumes on the next run"
    model = from_pretrained(args.model, device=args.device, dtype=args.dtype, source=args.source,
                            revision=args.revision, cache_dir=args.cache_dir)
    tokenizer = load_tokenizer(args.model, source=args.source, revision=args.revision, cache_dir=args.cache_dir)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(args.seed)
    options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "generator": generator,
               "repetition_penalty": args.repetition_penalty, "stop": args.stop or None}
    args.interrupted = "interrupted; generation stopped"
    if args.num_return_sequences > 1:
        texts = generate_text(model, tokenizer, prompt, args.max_new_tokens,
                              num_return_sequences=args.num_return_sequences, **options)
        for i, text in enumerate(texts, start=1):
            print(f"--- {i} ---\n{text}")
        return 0
    sys.stdout.write(prompt)
    sys.stdout.flush()
    try:
        for piece in stream_text(model, tokenizer, prompt, args.max_new_tokens, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:  # the shell's prompt starts on a line of its own, however the text ended
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_model

    folder = export_model(args.name, args.folder, format=args.format, dtype=args.dtype, source=args.source,
                          revision=args.revision, cache_dir=args.cache_dir, overwrite=args.overwrite)
    print(f"wrote {args.format} files of {args.name} to {folder}")
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    from .mirror import SUMS, write_mirror

    written = write_mirror(args.folder, args.names or None, cache_dir=args.cache_dir, link=args.link)
    for f in written:
        print(f"{f.how}\t{_human(f.size)}\t{f.path}")
    folder = Path(args.folder)
    print(f"wrote {len(written)} file(s) and {folder / SUMS}; serve it with `python -m http.server -d {folder} 8000` "
          "and set GPT2HUB_OPENAI_URL=http://THIS_HOST:8000 on the other machines")
    return 0


def cmd_cache_list(args: argparse.Namespace) -> int:
    from .inventory import scan_cache

    info = scan_cache(args.cache_dir)
    if not info.exists and not args.json:
        print(f"there is no gpt2hub cache at {info.root} yet: nothing is cached")
        return 0
    if args.json:
        print(json.dumps({"root": str(info.root), "total_bytes": info.total_bytes,
                          "models": [{**asdict(m), "path": str(m.path), "status": m.status} for m in info.models]},
                         indent=2))
        return 0
    if not info.models:
        print(f"the cache at {info.root} is empty")
        return 0
    print(f"cache: {info.root}")
    rows = [(m.name, m.source + (f"@{m.commit[:8]}" if m.commit else ""), m.size, m.status, _human(m.bytes_on_disk),
             ",".join(m.dtypes) or "-", _when(m.last_modified), _when(m.last_used)) for m in info.models]
    heads = ("model", "source", "size", "status", "on disk", "dtypes", "modified", "last used")
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    for row in [heads, *rows]:
        print("  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip())
    for m in info.models:
        if m.bytes_elsewhere or m.revisions:
            refs = f", revision {', '.join(m.revisions)}" if m.revisions else ""
            print(f"  {m.name} ({m.source}{refs}): +{_human(m.bytes_elsewhere)} in the Hugging Face cache")
    print(f"total: {_human(info.total_bytes)} in {len(info.models)} model folder(s)")
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    from .hub import repair
    from .inventory import check_cache

    checked = check_cache(args.cache_dir, mark_problems=not args.repair)
    if checked.entries is None:
        print(f"there is no gpt2hub cache at {checked.root}: nothing to verify")
        return 0
    if not checked.entries:
        print(f"the cache at {checked.root} holds no model: nothing to verify")
    bad = 0
    for entry, problems in checked.entries:
        print(f"{entry.key}: {'ok' if not problems else f'{len(problems)} problem(s)'}")
        for p in problems:
            print(f"  {p}")
        if problems and args.repair:
            left = repair(entry)
            print(f"  repaired{'' if not left else f'; {len(left)} problem(s) left: ' + '; '.join(map(str, left))}")
            bad += len(left)
        else:
            bad += len(problems)
    if bad and not args.repair:
        print(f"{bad} missing or damaged file(s), marked: the next load repairs them; `gpt2hub cache verify --repair` "
              "repairs them now", file=sys.stderr)
    return 1 if bad else 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    from .inventory import plan_removal, remove

    if not args.name and not args.all:
        raise ValueError("name a model to remove (gpt2hub cache rm gpt2-small) or pass --all")
    plan = plan_removal(args.cache_dir, None if args.all else args.name, args.source, args.dtype, args.include_hf)
    if not plan:
        what = args.name or "no model"
        if args.dtype and args.name and plan_removal(args.cache_dir, args.name, args.source):
            print(f"nothing to remove: {args.name} is cached, but no {args.dtype} weights of it are stored")
        else:
            print(f"nothing to remove: {what} is not in the cache")
        return 0
    for item in plan:
        print(f"{'would remove' if args.dry_run else 'remove'} {item.what} ({_human(item.bytes)})")
    if args.dry_run:
        print(f"would free {_human(sum(i.bytes for i in plan))}")
        return 0
    if not args.yes and sys.stdin.isatty() and input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
        print("nothing removed")
        return 1
    removed = remove(plan, timeout=args.timeout)
    print(f"freed {_human(removed.bytes)}")
    if removed.left:
        print(f"left {len(removed.left)} file(s) gpt2hub did not write, e.g. {removed.left[0]}", file=sys.stderr)
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    from .files import default_root
    from .inventory import prune

    freed = 0
    for p in prune(Path(args.cache_dir) if args.cache_dir else default_root()):
        freed += p.bytes
        stale = " (stale lock)" if p.path.suffix == ".lock" else ""
        print(f"{p.action} {p.path}" + (f": {p.why}" if p.why else "") + stale)
    print(f"freed {_human(freed)}")
    return 0


def bench_config(args: argparse.Namespace) -> Any:
    """The BenchConfig that `gpt2hub bench` options ask for: --quick's settings, else the full run's, and any option
    given on the command line over them."""
    from .bench import BenchConfig, quick_config

    given = {"model": args.model, "devices": args.device, "dtypes": args.dtype, "batch_sizes": args.batch_sizes,
             "prompt_lengths": args.prompt_lengths, "new_tokens": args.new_tokens, "repeats": args.repeats}
    given = {k: v for k, v in given.items() if v is not None}
    if args.repeats is not None:
        given["load_repeats"] = args.repeats  # asked for: loads too, --quick or not
    flags = {"real_cache": args.real_cache, "transformers": False if args.no_transformers else None,
             "notebook": False if args.no_notebook else None, "plots": False if args.no_plots else None,
             "cold": False if args.no_cold else None}
    given.update({k: v for k, v in flags.items() if v is not None})
    return quick_config(**given) if args.quick else BenchConfig(**given)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import compare, markdown, run
    from .hub import check_device

    out = Path(args.out)
    if args.bench_command == "compare":
        print(compare([Path(f) for f in args.files], out), end="")
        print(f"wrote {out / 'compare.md'} and plots in {out}")
        return 0
    cfg = bench_config(args)
    for device in cfg.devices:
        check_device(device)
    results = run(cfg, out)
    print(markdown([results]), end="")
    plots = " and plots" if cfg.plots else ""
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}{plots} in {out}")
    return 0


# the parser --------------------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """Usage errors are one line, `gpt2hub: error: ...`, exit status 2, with a suggestion for a mistyped choice.

    Each option's help ends with its default, written once: added here unless the help already says it, and left
    out where there is nothing to say (a flag, or None: the help tells what happens without the option).
    """

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        default, text = kwargs.get("default"), kwargs.get("help")
        nothing = default is None or default is False or default is argparse.SUPPRESS  # 0 and 0.0 are defaults
        if text and args and str(args[0]).startswith("-") and "default" not in text and not nothing:
            shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            kwargs["help"] = f"{text} (default: {shown})"
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.exit(2, f"gpt2hub: error: {self.prog.removeprefix('gpt2hub').strip() or 'usage'}: {message}"
                     f"{_suggestion(message)} (see `{self.prog} --help`)\n")


def _suggestion(message: str) -> str:
    """'; did you mean 'generate'?' for argparse's "invalid choice: 'generat' (choose from ...)", else ''."""
    found = re.search(r"invalid choice: '?([^'\s]*)'? \(choose from (.*)\)", message)
    if not found:
        return ""
    choices = [c.strip(" '\"") for c in found.group(2).split(",")]
    close = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _common(p: argparse.ArgumentParser, source: bool = True) -> None:
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="cache folder (default: GPT2HUB_CACHE, else the platform's user cache folder)")
    if source:
        p.add_argument("--source", default="openai", choices=SOURCES,
                       help="OpenAI's published files, or openai-community/* on the Hugging Face Hub")
        p.add_argument("--revision", default=None,
                       help="Hugging Face revision: branch, tag or commit (--source hf only; default: main)")


# what Ctrl-C leaves behind, per command (generate says more precisely once it knows whether it is loading)
KEPT = "partial downloads are kept and resume on the next run"
WHOLE = "every file gpt2hub writes appears whole or not at all"


def _sub(sub: Any, name: str, helptext: str, examples: str, interrupted: str = "interrupted") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext, description=helptext, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n" + examples)
    p.set_defaults(interrupted=interrupted)
    return p


def _generate_parser(sub: Any) -> None:
    g = _sub(sub, "generate", "continue a prompt, streaming the text",
             '  gpt2hub generate "Every effort moves you"\n'
             '  gpt2hub generate --model gpt2-medium --temperature 0.8 --top-k 50 --seed 1 "Once upon a time"\n'
             "  cat prompt.txt | gpt2hub generate -")  # cmd_generate says more once it loads, then generates
    g.add_argument("prompt", help="the text to continue; - reads it from standard input")
    g.add_argument("--model", type=MODEL, default="gpt2-small", help="a model name, size, Hugging Face id or folder")
    _common(g)
    g.add_argument("--max-new-tokens", type=TOKENS, default=50, help="tokens to generate")
    g.add_argument("--temperature", type=TEMPERATURE, default=0.0, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-k", type=TOP_K, default=0, help="sample among the k most likely tokens; 0 is off")
    g.add_argument("--top-p", type=TOP_P, default=1.0, help="sample from the smallest set with this much mass; 1 is off")
    g.add_argument("--seed", type=SEED, default=None,
                   help="seed for sampling: the same seed gives the same text (default: a fresh seed each run)")
    g.add_argument("--repetition-penalty", type=PENALTY, default=1.0,
                   help="divide the scores of tokens already in the text by this (transformers' rule); 1 is off")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop once the text contains TEXT (may be given several times); TEXT is not printed")
    g.add_argument("--num-return-sequences", type=POSITIVE_SMALL, default=1, help="continuations to sample and print")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype")
    g.set_defaults(func=cmd_generate)


def _bench_parser(sub: Any) -> None:
    b = _sub(sub, "bench", "time loading and generation on this machine, beside transformers",
             "  gpt2hub bench --quick                        # under a minute: the main figures, fewer settings\n"
             "  gpt2hub bench --dtype float32 bfloat16 --out results/\n"
             "  gpt2hub bench compare cpu/results.json gpu/results.json --out compare/",
             "interrupted; the benchmark stopped and wrote no results")
    b.add_argument("--quick", action="store_true",
                   help="a run under a minute on a 2-core CPU: batch 1, a 16-token prompt, 16 new tokens, no cold "
                        "loads, no notebook path, no plots; options given beside it still apply")
    b.add_argument("--model", type=MODEL, default=None, help="model whose size to time (default: gpt2-small)")
    b.add_argument("--device", nargs="+", default=None, help="one or more devices, e.g. cpu cuda (default: cpu)")
    b.add_argument("--dtype", nargs="+", default=None, choices=DTYPES, help="one or more dtypes (default: float32)")
    b.add_argument("--batch-sizes", nargs="+", type=POSITIVE, default=None,
                   help="batch sizes for generation (default: 1 4; --quick: 1)")
    b.add_argument("--prompt-lengths", nargs="+", type=POSITIVE, default=None,
                   help="prompt lengths in tokens (default: 16 512; --quick: 16)")
    b.add_argument("--new-tokens", type=NEW_TOKENS, default=None,
                   help="tokens generated per timing (default: 32; --quick: 16)")
    b.add_argument("--repeats", type=POSITIVE, default=None,
                   help="timings of each generation setting and loads of each kind; medians are reported with min and "
                        "max (default: 3; --quick: 3 timings, 2 loads)")
    b.add_argument("--real-cache", action="store_true", help="use your cached real weights, skip the cold load")
    b.add_argument("--no-cold", action="store_true", help="do not time cold loads (an empty cache fed from 127.0.0.1)")
    b.add_argument("--no-transformers", action="store_true", help="do not time transformers beside gpt2hub")
    b.add_argument("--no-notebook", action="store_true", help="do not time the notebook path (TensorFlow)")
    b.add_argument("--no-plots", action="store_true", help="write no PNG plots (make them later with `bench compare`)")
    b.add_argument("--out", default="gpt2hub-bench", help="folder for results.json, results.md and plots")
    bsub = b.add_subparsers(dest="bench_command", metavar="{compare}")
    cmp_ = _sub(bsub, "compare", "merge the results.json files of several machines into one table and plot",
                "  gpt2hub bench compare laptop/results.json h100/results.json --out compare/")
    cmp_.add_argument("files", nargs="+", help="results.json files")
    cmp_.add_argument("--out", default="gpt2hub-compare", help="folder for compare.md and plots")
    b.set_defaults(func=cmd_bench)


def _cache_parser(sub: Any) -> None:
    c = _sub(sub, "cache", "inspect and tidy the cache",
             "  gpt2hub cache list --json\n  gpt2hub cache rm gpt2-xl --dry-run\n  gpt2hub cache verify")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="{list,verify,rm,prune}")
    ls = _sub(csub, "list", "models, sources, dtypes, bytes on disk, status and dates", "  gpt2hub cache list --json")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=cmd_cache_list)
    v = _sub(csub, "verify", "re-hash every file; one line per missing or damaged file, marked so that the next load "
             "repairs it (or repaired now with --repair); exit 1 on any",
             "  gpt2hub cache verify\n  gpt2hub cache verify --repair", "interrupted; what was checked so far is marked")
    v.add_argument("--repair", action="store_true", help="download or convert again what is damaged, now")
    v.set_defaults(func=cmd_cache_verify)
    rm = _sub(csub, "rm", "delete models (or one dtype's weights) from the cache, reporting the bytes freed",
              "  gpt2hub cache rm gpt2-small\n  gpt2hub cache rm --all --dry-run\n  gpt2hub cache rm 124M --dtype bfloat16 -y",
              "interrupted; what was removed so far stays removed: `gpt2hub cache list` shows what is left")
    rm.add_argument("name", nargs="?", type=MODEL, help="model name or size folder (as `cache list` shows it)")
    rm.add_argument("--all", action="store_true", help="every model in the cache")
    rm.add_argument("--source", choices=SOURCES, default=None, help="only this source (default: both)")
    rm.add_argument("--dtype", choices=DTYPES, default=None,
                    help="only the prepared weights of this dtype, the published files stay (default: every dtype)")
    rm.add_argument("--include-hf", action="store_true", help="also delete the files in the Hugging Face cache")
    rm.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    rm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation on a terminal")
    rm.add_argument("--timeout", type=SECONDS, default=60.0, help="seconds to wait for a process using the model")
    rm.set_defaults(func=cmd_cache_rm)
    pr = _sub(csub, "prune", "delete partial downloads, temporary files and stale locks", "  gpt2hub cache prune")
    pr.set_defaults(func=cmd_cache_prune)
    for p in (ls, v, rm, pr):
        _common(p, source=False)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpt2hub", description="OpenAI's GPT-2 weights as PyTorch models, cached and verified.",
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog="examples:\n  gpt2hub download gpt2-small\n"
               '  gpt2hub generate "Every effort moves you"\n  gpt2hub cache list')
    p.add_argument("--version", action="version", version=f"gpt2hub {__version__}")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log where models come from, each stage's time, locks and retries; tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="{download,generate,export,mirror,cache,bench}")
    d = _sub(sub, "download", "fetch a model's published files into the cache",
             "  gpt2hub download gpt2-small\n  gpt2hub download gpt2-xl --source hf --revision main", f"interrupted; {KEPT}")
    d.add_argument("name", type=MODEL, help="a model name, size or Hugging Face id")
    _common(d)
    d.add_argument("--force", action="store_true", help="download again even if cached")
    d.set_defaults(func=cmd_download)
    e = _sub(sub, "export", "write a model as a Hugging Face folder (transformers, vLLM, TGI) or gpt2hub safetensors",
             "  gpt2hub export gpt2-small ./gpt2-small-hf\n  gpt2hub export gpt2-xl ./xl --dtype bfloat16",
             f"interrupted; {WHOLE}, and {KEPT}")
    e.add_argument("name", type=MODEL, help="a model name, size, Hugging Face id or folder")
    e.add_argument("folder", help="the folder to write (created if needed)")
    e.add_argument("--format", default="hf", choices=["hf", "safetensors"], help="Hugging Face's layout or gpt2hub's")
    e.add_argument("--dtype", default=None, choices=EXPORT_DTYPES, help="dtype of the written weights (default: float32)")
    e.add_argument("--overwrite", action="store_true", help="export into a folder that is not empty, first removing "
                   "the files an export writes and those its readers would also read (other files stay)")
    _common(e)
    e.set_defaults(func=cmd_export)
    mi = _sub(sub, "mirror", "write cached models in OpenAI's layout with SHA256SUMS, for other machines to download",
              "  gpt2hub mirror /srv/gpt2 && python -m http.server -d /srv/gpt2 8000\n"
              "  GPT2HUB_OPENAI_URL=http://THIS_HOST:8000 gpt2hub download gpt2-small   # on another machine",
              f"interrupted; {WHOLE}: run the command again to finish the mirror")
    mi.add_argument("folder", help="the folder to fill (FOLDER/<size>/<file>, FOLDER/SHA256SUMS)")
    mi.add_argument("names", nargs="*", type=MODEL, help="models to mirror (default: every fully cached OpenAI model)")
    mi.add_argument("--link", action="store_true", help="hard-link instead of copying: no second copy on disk, but an "
                    "edit of a mirrored file in place (rsync --inplace) then changes the cache too")
    _common(mi, source=False)
    mi.set_defaults(func=cmd_mirror)
    _generate_parser(sub)
    _bench_parser(sub)
    _cache_parser(sub)
    return p


def _log_setup(verbose: bool) -> None:
    """gpt2hub's records once, on stderr, prefixed; other libraries' loggers (huggingface_hub) left as they are."""
    logger = logging.getLogger("gpt2hub")
    logger.handlers = [h for h in logger.handlers if not getattr(h, "_gpt2hub_cli", False)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("gpt2hub: %(message)s"))
    handler._gpt2hub_cli = True  # type: ignore[attr-defined]  # a marker on a stdlib handler, read back by getattr above
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_setup(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # the message fits what was stopped: each command says it (generate: loading, then not)
        print(f"gpt2hub: {args.interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (GPT2HubError, ValueError, OSError) as e:
        if args.verbose:
            traceback.print_exc()
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"gpt2hub: error: {message}", file=sys.stderr)
        # a bad argument (an unknown model name included: UnknownModelError is a ValueError) is 2, a failure 1
        return 2 if isinstance(e, ValueError) else 1
