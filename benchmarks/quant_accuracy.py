"""How far each storage of gpt2-small's weights moves its next-token distributions from float32's, on English text.

Teacher-forced: the same tokens (this repository's README.md, tokenized with GPT-2's real vocabulary from
tests/data) go through float32 and through each storage, in windows of up to 1,024 tokens; for every position the
script compares the next-token distributions: the mean KL divergence KL(float32 || storage) and how often the most
likely token is the same (top-1 agreement). Storages: bfloat16 and float16 (gpt2hub's 16-bit models), gpt2hub.quant's
int8 and int4 (each group size) with each head, and as yardsticks ggml's q8_0 and q4_0 (symmetric, blocks of 32
inputs, one float16 scale per block) applied in torch to the same weights (dequantized, run in float32, so the
yardsticks carry no activation rounding at all). ggml's gpt-2 example stores the embedding and the tied head in
that format too ("q4_0"); "q4_0 blocks" keeps them bfloat16, as gpt2hub's int4 keeps the embedding.

The weights are random (no real weights on this machine): `--weights synthetic` is gpt2hub.synthetic.random_weights
(the test checkpoint's: normal(0, 0.2)); `--weights gpt2-init` is GPTModel(cfg, init="gpt2") (normal(0, 0.02),
residual projections scaled). Random weights give flat distributions with small top-1 margins, so top-1 agreement
here is a pessimistic figure: trained weights have much larger margins between the first and second token.

    python benchmarks/quant_accuracy.py --out benchmarks/results/cpu-epyc-2core
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from _report import describe, machine, save, table

from gpt2hub import GPTModel, quant
from gpt2hub.convert import config_from_hparams, openai_state_dict
from gpt2hub.registry import resolve
from gpt2hub.synthetic import random_weights
from gpt2hub.tokenizer import encoding_from_files

ROOT = Path(__file__).resolve().parent.parent
Model = Callable[[torch.Tensor], torch.Tensor]


def text_tokens(n: int) -> tuple[torch.Tensor, str]:
    """The first `n` tokens of README.md (GPT-2's vocabulary) and the sha256 of the text read."""
    text = (ROOT / "README.md").read_text()
    enc = encoding_from_files(ROOT / "tests/data/encoder.json", ROOT / "tests/data/vocab.bpe")
    ids = enc.encode(text, disallowed_special=())
    if len(ids) < n:
        raise SystemExit(f"README.md has {len(ids)} tokens, fewer than the {n} asked for")
    return torch.tensor(ids[:n]), hashlib.sha256(text.encode()).hexdigest()


def float32_weights(kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """gpt2-small's config and float32 state_dict (contiguous, nn.Linear's layout) with random weights."""
    hp = resolve("gpt2-small").hparams()
    cfg = config_from_hparams(hp)
    if kind == "synthetic":
        w = random_weights(hp, seed=0)
        sd = openai_state_dict(lambda n: w[f"model/{n}"], cfg, torch.float32, layout="out_in")
    else:
        torch.manual_seed(0)
        sd = GPTModel(cfg, tie_weights=True, init="gpt2").state_dict()
        del sd["out_head.weight"]
    return cfg, {k: v.contiguous() for k, v in sd.items()}


def ggml_blocks(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`w` [out, in] through ggml's q8_0 or q4_0 and back (blocks of 32 inputs, float16 scale), as ggml rounds."""
    x = w.float().reshape(-1, 32)
    if bits == 8:
        d = (x.abs().amax(1, keepdim=True) / 127).half().float()
        q = (x / torch.where(d == 0, 1, d)).round().clamp(-127, 127)
        return (q * d).view(w.shape)
    signed = x.gather(1, x.abs().argmax(1, keepdim=True))  # q4_0: the value of largest magnitude maps to -8
    d = (signed / -8).half().float()
    q = (x / torch.where(d == 0, 1, d) + 8.5).trunc().clamp(0, 15)
    return ((q - 8) * d).view(w.shape)


def yardstick(cfg: dict, sd: dict[str, torch.Tensor], bits: int, embedding: bool) -> GPTModel:
    """A float32 GPTModel whose block matrices (and, with `embedding`, the tied embedding/head) went through ggml."""
    matrices = [k for k in sd if k.endswith(".weight") and (".att." in k or ".ff." in k)]
    if embedding:
        matrices.append("tok_emb.weight")
    return GPTModel.from_state_dict(cfg, {k: ggml_blocks(v, bits) if k in matrices else v for k, v in sd.items()})


def storages(cfg: dict, sd: dict[str, torch.Tensor], groups: list[int]) -> dict[str, Callable[[], Model]]:
    """Name -> a function building that storage's model (built one at a time: memory stays low)."""
    out: dict[str, Callable[[], Model]] = {
        "bfloat16": lambda: GPTModel.from_state_dict(cfg, {k: v.bfloat16() for k, v in sd.items()}),
        "float16": lambda: GPTModel.from_state_dict(cfg, {k: v.half() for k, v in sd.items()})}
    for head in quant.HEADS:
        out[f"int8, head {head}"] = lambda head=head: quant.quantized_model(
            cfg, quant.quantize_state_dict(sd, "int8", head=head), "int8", head=head)
    for g in groups:
        for head in quant.HEADS:
            out[f"int4 g{g}, head {head}"] = lambda g=g, head=head: quant.quantized_model(
                cfg, quant.quantize_state_dict(sd, "int4", g, head), "int4", g, head)
    out["ggml q8_0"] = lambda: yardstick(cfg, sd, 8, embedding=True)
    out["ggml q4_0"] = lambda: yardstick(cfg, sd, 4, embedding=True)
    out["ggml q4_0 blocks, head bfloat16"] = lambda: yardstick(cfg, sd, 4, embedding=False)
    return out


def log_probs(model: Model, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Next-token log-probabilities [positions, vocab] (float32) over consecutive windows of `ids`."""
    with torch.inference_mode():
        parts = [torch.log_softmax(model(ids[i:i + window][None])[0].float(), dim=-1)
                 for i in range(0, len(ids) - 1, window)]
    return torch.cat(parts)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    """Mean and largest KL(ref || got) over positions, and the share of positions with the same top token."""
    kl = (ref.exp() * (ref - got)).sum(-1).clamp(min=0)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", nargs="+", default=["gpt2-init"], choices=["synthetic", "gpt2-init"])
    parser.add_argument("--positions", type=int, default=2048, help="tokens read (windows of up to 1024)")
    parser.add_argument("--groups", nargs="+", type=int, default=list(quant.GROUP_SIZES))
    parser.add_argument("--only", nargs="+", default=None, metavar="WORD",
                        help="measure only the storages whose name contains one of these words")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    ids, digest = text_tokens(args.positions + 1)
    results = []
    for kind in args.weights:
        cfg, sd = float32_weights(kind)
        ref = log_probs(GPTModel.from_state_dict(cfg, sd), ids, 1024)
        top2 = ref.topk(2, dim=-1).values
        margin = statistics.median((top2[:, 0] - top2[:, 1]).tolist())
        for name, build in storages(cfg, sd, args.groups).items():
            if args.only and not any(word in name for word in args.only):
                continue
            row = {"weights": kind, "storage": name, **compare(ref, log_probs(build(), ids, 1024)),
                   "positions": ref.shape[0], "median_top1_margin_float32": margin}
            results.append(row)
            print(f"{kind:9s} {name:36s} KL {row['kl_mean']:.3g}  top-1 {row['top1']:.2%}", flush=True)
    info = machine(text="README.md", text_sha256=digest)
    lines = [f"Next-token distributions of gpt2-small (random weights) against float32, teacher-forced over "
             f"{results[0]['positions']} positions of README.md (GPT-2's vocabulary), {describe(info)}", ""]
    lines += table(["weights", "storage", "mean KL", "max KL", "top-1 agreement"],
                   [(r["weights"], r["storage"], f"{r['kl_mean']:.2e}", f"{r['kl_max']:.2e}", f"{r['top1']:.1%}")
                    for r in results])
    lines += ["", "Median log-probability margin between float32's first and second token: " + ", ".join(
        f"{kind} {next(r['median_top1_margin_float32'] for r in results if r['weights'] == kind):.3f}"
        for kind in args.weights) + " (trained weights have far larger margins, so top-1 agreement here is pessimistic)."]
    save(lines, args.out, "quant_accuracy", {"machine": info, "results": results})


if __name__ == "__main__":
    main()
