"""gpt2hub.native against inputs its guards must turn away: rows of the wrong shape, tensors whose data_ptr is not
their values' memory (negative views, fake tensors, functorch wrappers), memory a factory function would put on
another device, and int8 scales of another shape. Each one either runs on the kernels with F.linear's result or is
left to the caller; none may read or write memory it does not own (the crashing cases run in a child process)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2hub import kernels, native, quant

BF16 = torch.bfloat16
needs_kernels = pytest.mark.skipif(not native.AVAILABLE, reason=f"gpt2hub.native does not run here: {native.status()}")


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", True)


@needs_kernels
@pytest.mark.parametrize("shape", [(2, 20), (40, 1), ()], ids=["2x20", "40x1", "scalar"])
def test_inputs_holding_in_values_in_another_shape_are_not_one_row(shape):
    # x.numel() == in, but x is not [..., in]: F.linear refuses it; the kernels must not compute one row into an
    # output of x.shape[:-1] + (out,) and hand back the rest of it uninitialized
    k = 40 if shape else 1
    w, b = torch.randn(5, k), torch.randn(5)
    x = torch.randn(k).reshape(shape)
    codes, scale = quant.quantize_int8(w)
    assert native.linear_row(x, w, b) is None
    assert native.int8_row(x.to(BF16), codes, scale, b.to(BF16), 5) is None
    with torch.no_grad(), pytest.raises((RuntimeError, IndexError)):  # (scalar: oneDNN's op raises IndexError)
        kernels.linear(x, w, b)


@needs_kernels
@pytest.mark.parametrize("which", ["x", "weight", "bias"])
def test_negative_views_give_their_values(which):
    # a view with the negative bit (torch._neg_view; the imaginary part of a conjugated complex tensor) holds -v for
    # the v in its memory: reading data_ptr gives the wrong sign
    x, w, b = torch.randn(1, 40), torch.randn(5, 40), torch.randn(5)
    args = {"x": x, "weight": w, "bias": b}
    args[which] = torch._neg_view(args[which])
    assert args[which].is_neg()
    with torch.no_grad():
        y = kernels.linear(args["x"], args["weight"], args["bias"])
    torch.testing.assert_close(y, F.linear(args["x"].clone(), args["weight"].clone(), args["bias"].clone()))


@needs_kernels
def test_the_imaginary_part_of_a_conjugate_is_read_with_its_sign():
    x = torch.randn(1, dtype=torch.complex64).conj().imag.view(1, 1)  # contiguous, negative bit set
    w = torch.randn(3, 1)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, w), F.linear(x.clone(), w))


@needs_kernels
def test_int8_scales_must_be_one_per_row():
    w = torch.randn(5, 40)
    codes, scale = quant.quantize_int8(w)
    x = torch.randn(1, 40).to(BF16)
    assert native.int8_row(x, codes, scale.view(5, 1), None, 5) is None
    assert native.int8_row(x, codes, torch.ones(5, 0, dtype=BF16), None, 5) is None  # no scales at all


_CHILD = """
import torch, torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from gpt2hub import kernels, native, quant
assert native.AVAILABLE and native.__file__.startswith({root!r}), native.__file__
torch.manual_seed(0)
x, w, b = torch.randn(1, 40), torch.randn(5, 40), torch.randn(5)
codes, scale = quant.quantize_int8(w)
xb, bb = x.to(torch.bfloat16), b.to(torch.bfloat16)
want, want8 = F.linear(x, w, b), native.int8_row(xb, codes, scale, bb, 5)
torch.set_grad_enabled(False)
case = {case!r}
if case == "meta device context":
    with torch.device("meta"):
        y, y8 = kernels.linear(x, w, b), native.int8_row(xb, codes, scale, bb, 5)
    assert y.is_cpu and torch.allclose(y, want) and (y8 is None or torch.equal(y8, want8))
elif case == "default device meta":
    torch.set_default_device("meta")
    y, y8 = kernels.linear(x, w, b), native.int8_row(xb, codes, scale, bb, 5)
    torch.set_default_device("cpu")
    assert y.is_cpu and torch.allclose(y, want) and (y8 is None or torch.equal(y8, want8))
elif case == "fake tensors":
    with FakeTensorMode():
        fx, fw, fb = torch.randn(1, 40), torch.randn(5, 40), torch.randn(5)
        assert kernels.linear(fx, fw, fb).shape == (1, 5)
elif case == "real tensors in a fake mode":
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert kernels.linear(x, w, b).shape == (1, 5)
        assert native.int8_row(xb, codes, scale, bb, 5) is None
elif case == "functionalize":
    assert torch.allclose(torch.func.functionalize(lambda t: kernels.linear(t, w, b))(x), want)
elif case == "vmap":
    xs = torch.randn(3, 40)
    assert torch.allclose(torch.vmap(lambda t: kernels.linear(t, w, b))(xs), F.linear(xs, w, b), atol=1e-5)
elif case == "int8 scales with no values":
    assert native.int8_row(xb, codes, torch.ones(5, 0, dtype=torch.bfloat16), bb, 5) is None
print("ok")
"""


@needs_kernels
@pytest.mark.parametrize("case", ["meta device context", "default device meta", "fake tensors",
                                  "real tensors in a fake mode", "functionalize", "vmap", "int8 scales with no values"])
def test_tensors_whose_memory_is_not_their_values_do_not_crash(case):
    # these crashed the process (SIGSEGV: the kernels wrote to a meta or fake tensor's "memory") or raised where
    # F.linear runs: a child process, so a crash fails this test rather than the whole run
    root = str(Path(native.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = textwrap.dedent(_CHILD).format(root=root, case=case)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-2000:])
