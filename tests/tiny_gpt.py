"""Small models, prompts and tokenizer shared by the generation tests."""

from __future__ import annotations

import torch
from factory import DATA, hf_reference, hf_tensors, random_weights
from torch.overrides import TorchFunctionMode

from gpt2hub import GPTModel, state_dict_from_hf
from gpt2hub.convert import config_from_hparams
from gpt2hub.tokenizer import encoding_from_files

HP = {"n_vocab": 500, "n_ctx": 40, "n_embd": 32, "n_head": 4, "n_layer": 2}


def tiny_pair(hp: dict = HP, seed: int = 5) -> tuple[GPTModel, torch.nn.Module]:
    """gpt2hub's GPTModel and transformers' GPT2LMHeadModel holding the same random weights."""
    ref = hf_reference(random_weights(hp, seed=seed, scale=0.3), hp)
    cfg = config_from_hparams(hp)
    return GPTModel.from_state_dict(cfg, state_dict_from_hf(ref.transformer.state_dict(), cfg)), ref


def text_model(hp: dict, seed: int = 2) -> GPTModel:
    """A GPTModel with GPT-2's real vocabulary size, for the text functions."""
    cfg = config_from_hparams(hp)
    tensors = {k: torch.from_numpy(v) for k, v in hf_tensors(random_weights(hp, seed=seed)).items()}
    return GPTModel.from_state_dict(cfg, state_dict_from_hf(tensors, cfg))


def tokenizer():
    return encoding_from_files(DATA / "encoder.json", DATA / "vocab.bpe")


def prompt(b: int, t: int, seed: int = 0, vocab: int = HP["n_vocab"]) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths as one left-padded batch and its attention mask."""
    width = max(len(r) for r in rows)
    idx = torch.stack([torch.cat([torch.full((width - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([(torch.arange(width) >= width - len(r)).long() for r in rows])
    return idx, mask


class LargestTensor(TorchFunctionMode):
    """Records the most elements any tensor made by a torch call inside it held (torch.empty allocates lazily, so
    a huge buffer costs no time: its size is what shows it)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.numel = max(self.numel, out.numel())
        return out
