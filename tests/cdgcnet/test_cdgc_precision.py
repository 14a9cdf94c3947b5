"""The CDGC graph keeps its precision under bf16 autocast (reference: a float64 copy).

Setting: C=512, M=19, a 33x33 grid, BN+ReLU-like inputs (ReLU of a standard normal), graph="ds"
at ratio 1, the module's initial weights and the same with phi, phi' scaled x2 (a sharper graph,
as after training). Both modules see the same bf16-rounded input and the same output gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdgcnet.cdgc import CDGCModule

B, C, H, W, M = 1, 512, 33, 33, 19
TOLERANCE = 0.02  # relative L2 error of every gradient


def _inputs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    low = torch.randn(B, M, 4, 4, generator=g)
    coarse = 4.0 * F.interpolate(low, size=(H, W), mode="bilinear")  # (B, M, H, W)
    noisy = low + 0.3 * torch.randn(low.shape, generator=g)
    target = F.interpolate(noisy, size=(H, W), mode="bilinear").argmax(1)  # (B, H, W)
    x = torch.relu(torch.randn(B, C, H, W, generator=g)).bfloat16()  # a bf16 conv's output
    grad_out = torch.randn(B, C, H, W, generator=g)
    return (t.to(device) for t in (x, coarse, target, grad_out))


def _module(precision: str, sharpen: float, device: torch.device, **kw) -> CDGCModule:
    torch.manual_seed(0)
    mod = CDGCModule(C, M, graph="ds", ratio=1.0, precision=precision, **kw).to(device).train()
    with torch.no_grad():
        mod.phi.weight.mul_(sharpen)
        mod.phi_prime.weight.mul_(sharpen)
    return mod


def _grads(mod: CDGCModule, x, coarse, target, grad_out, low: bool) -> dict[str, torch.Tensor]:
    """Output and gradients of one forward/backward, under bf16 autocast when `low`."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=low):
        out = mod(x, coarse, target)
    (out * grad_out.to(out.dtype)).sum().backward()
    return {
        "out": out.detach(),
        "x": x.grad,
        "phi": mod.phi.weight.grad,
        "phi_prime": mod.phi_prime.weight.grad,
        "W_m": mod.graph_weight.grad,
        "aggregate": mod.aggregate_weight.grad,
    }


_REFERENCES: dict[tuple[float, str], dict[str, torch.Tensor]] = {}


def _errors(precision: str, sharpen: float, device: torch.device, **kw) -> dict[str, float]:
    """Relative L2 errors of the output and gradients under bf16 autocast vs float64."""
    x, coarse, target, grad_out = _inputs(device)
    key = (sharpen, device.type)
    if key not in _REFERENCES:  # one float64 run per setting, shared by the cases
        ref = _module(precision, sharpen, device).double()
        _REFERENCES[key] = _grads(ref, x.double(), coarse.double(), target, grad_out, False)
    ref = _REFERENCES[key]
    low = _grads(_module(precision, sharpen, device, **kw), x, coarse, target, grad_out, True)
    return {k: ((low[k].double() - ref[k]).norm() / ref[k].norm()).item() for k in ref}


@pytest.mark.parametrize(
    ("sharpen", "checkpoint"),
    [(1.0, False), (2.0, False), (2.0, True)],
    ids=["init", "sharpened", "sharpened-checkpointed"],
)
def test_default_keeps_gradients_within_two_percent(sharpen: float, checkpoint: bool) -> None:
    errors = _errors("fp32", sharpen, torch.device("cpu"), checkpoint=checkpoint)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("sharpen", [1.0, 2.0], ids=["init", "sharpened"])
def test_autocast_switch_follows_bf16_and_loses_gradient_precision(sharpen: float) -> None:
    # The documented speed switch: the graph in bf16, with the error the default avoids.
    errors = _errors("autocast", sharpen, torch.device("cpu"))
    assert errors["phi"] > 0.05 and errors["x"] > 0.05, errors


def test_default_output_is_float32_under_autocast_and_unchanged_outside() -> None:
    torch.manual_seed(0)
    mod = CDGCModule(16, 3, graph="sim").eval()
    x = torch.randn(1, 16, 5, 4)
    coarse = torch.randn(1, 3, 5, 4)
    plain = mod(x, coarse)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = mod(x.bfloat16(), coarse)
    assert inside.dtype == torch.float32
    # The only difference is the bf16 rounding of the input.
    torch.testing.assert_close(inside, mod(x.bfloat16().float(), coarse))
    assert plain.dtype == torch.float32


def test_precision_is_validated() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        CDGCModule(8, 3, precision="bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("sharpen", [1.0, 2.0], ids=["init", "sharpened"])
def test_default_keeps_gradients_within_two_percent_on_cuda(sharpen: float) -> None:
    errors = _errors("fp32", sharpen, torch.device("cuda"))
    assert max(errors.values()) <= TOLERANCE, errors
