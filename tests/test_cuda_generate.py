"""CUDA checks of batched generation (left padding under a captured CUDA graph); run with -m cuda on a GPU."""

import pytest
import torch
from tiny_gpt import left_pad, tiny_pair

from gpt2hub import generate

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("context_size", [None, 12])
def test_padded_batch_under_cuda_graph_equals_each_prompt_alone(context_size):
    assert torch.cuda.is_available(), "these tests need a CUDA GPU"
    model = tiny_pair()[0].to("cuda")
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, 500, (n,), generator=g).cuda() for n in (3, 9, 1, 14)]
    idx, mask = left_pad([r.cpu() for r in rows], pad_id=7)
    idx, mask = idx.cuda(), mask.cuda()
    out = generate(model, idx, 20, context_size=context_size, attention_mask=mask, decode="cuda_graph")
    assert torch.equal(out, generate(model, idx, 20, context_size=context_size, attention_mask=mask, decode="eager"))
    for i, row in enumerate(rows):
        alone = generate(model, row[None], 20, context_size=context_size, decode="cuda_graph")
        assert torch.equal(out[i, idx.shape[1]:], alone[0, len(row):]), i
