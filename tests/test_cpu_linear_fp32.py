"""`sdlab.models.cpu_linear.geglu` on any CPU (fp32, no oneDNN post-ops needed): in inference the GELU and the
gating are written over the two products' own outputs (no fresh (..., inner) tensors), with the same values
bit for bit as the out-of-place ops; with gradients the out-of-place ops run and the backward is right."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sdlab.models import cpu_linear


class _Ops(TorchDispatchMode):
    """Records the ATen operations that run."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _proj(c_in, inner, seed=0):
    torch.manual_seed(seed)
    proj = nn.Linear(c_in, 2 * inner)
    nn.init.normal_(proj.bias, std=0.5)
    return proj


def _plain(x, proj):
    a, gate = proj(x).chunk(2, dim=-1)
    return a * F.gelu(gate)


def _halves(x, proj):
    """The out-of-place ops over the weight's row halves (the products geglu runs)."""
    inner = proj.out_features // 2
    b_a, b_gate = (None, None) if proj.bias is None else (proj.bias[:inner], proj.bias[inner:])
    return F.linear(x, proj.weight[:inner], b_a) * F.gelu(F.linear(x, proj.weight[inner:], b_gate))


def test_inference_gates_in_place_with_the_same_values():
    proj = _proj(32, 48)
    x = torch.randn(2, 70, 32)
    with torch.no_grad():
        with _Ops() as ops:
            ours = cpu_linear.geglu(x, proj)   # (2, 70, 48)
        halves, plain = _halves(x, proj), _plain(x, proj)
    assert ours.shape == (2, 70, 48)
    assert torch.equal(ours, halves)
    assert torch.allclose(ours, plain, atol=1e-6, rtol=1e-5)
    assert "aten.gelu_.default" in ops.names and "aten.mul_.Tensor" in ops.names
    assert "aten.gelu.default" not in ops.names and "aten.mul.Tensor" not in ops.names   # no fresh outputs


def test_with_gradients_the_out_of_place_ops_run_and_backward_is_right():
    proj = _proj(16, 24, seed=1)
    x = torch.randn(3, 16, requires_grad=True)
    with _Ops() as ops:
        out = cpu_linear.geglu(x, proj)
    assert "aten.gelu_.default" not in ops.names and "aten.mul_.Tensor" not in ops.names
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    _plain(x_ref, proj).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    assert proj.weight.grad is not None


def test_without_a_bias_and_in_inference_mode():
    proj = nn.Linear(8, 16, bias=False)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        assert torch.equal(cpu_linear.geglu(x, proj), _halves(x, proj))
