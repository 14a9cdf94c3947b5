"""CPUSyncBatchNorm over 2 gloo ranks equals BatchNorm2d over the whole batch: outputs, input
and weight gradients, running statistics."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from launch.distributed import CPUSyncBatchNorm, convert_sync_batchnorm


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64) * 2 + 1  # (B, C, H, W)
    w = torch.randn(4, 3, 5, 6, generator=g, dtype=torch.float64)  # weights of the loss
    return x, w


def _bn() -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn


def _worker(rank: int, out_dir: str) -> None:
    # A FileStore, not a TCP store hosted by rank 0: with TCP, rank 0 could exit while rank 1
    # was still tearing down, which intermittently aborted rank 1 (SIGABRT) under load.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2
    )
    try:
        x, w = _data()
        xs = x[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        bn = convert_sync_batchnorm(torch.nn.Sequential(_bn()), "cpu")[0]
        assert isinstance(bn, CPUSyncBatchNorm)
        y = bn(xs)
        (y * w[2 * rank : 2 * rank + 2]).sum().backward()
        torch.save(
            {
                "y": y.detach(),
                "gx": xs.grad,
                "gw": bn.weight.grad,
                "gb": bn.bias.grad,
                "mean": bn.running_mean,
                "var": bn.running_var,
            },
            f"{out_dir}/{rank}.pt",
        )
        torch.distributed.barrier()  # both ranks done before either tears down
    finally:
        torch.distributed.destroy_process_group()


def test_cpu_sync_batchnorm_matches_full_batch(tmp_path) -> None:
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    x, w = _data()
    x = x.clone().requires_grad_(True)
    bn = _bn()
    y = bn(x)
    (y * w).sum().backward()
    torch.testing.assert_close(torch.cat([r0["y"], r1["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([r0["gx"], r1["gx"]]), x.grad)
    # Each rank holds its share of the parameter gradient; DeepSpeed sums them across ranks.
    torch.testing.assert_close(r0["gw"] + r1["gw"], bn.weight.grad)
    torch.testing.assert_close(r0["gb"] + r1["gb"], bn.bias.grad)
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)
