"""`python -m cdgcnet`: build CDGCNet from a preset, run forward/backward on a random batch.

A quick end-to-end check of the model package on CPU (or CUDA when present); prints shapes,
the loss terms of eq. (5) and timings.
"""

from __future__ import annotations

import argparse
import time

import torch

from cdgcnet.config import PRESETS, model_preset
from cdgcnet.inference import predict_logits
from cdgcnet.losses import CDGCLoss
from cdgcnet.metrics import ConfusionMatrix
from cdgcnet.model import build_model, param_groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cdgcnet", description=__doc__)
    parser.add_argument("--preset", default="cpu_small", choices=PRESETS)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=129, help="square input side in pixels")
    parser.add_argument("--steps", type=int, default=2, help="SGD steps on the random batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_preset(args.preset)
    t0 = time.perf_counter()
    model = build_model(cfg).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"preset {args.preset}: {cfg}")
    print(f"built CDGCNet in {time.perf_counter() - t0:.2f} s: {n_params / 1e6:.2f} M parameters")

    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    target = torch.randint(0, cfg.num_classes, (args.batch, args.size, args.size), device=device)
    target[:, : args.size // 8] = 255  # a band of ignore pixels
    criterion = CDGCLoss(ohem_min_kept=args.batch * args.size * args.size // 4)
    optimizer = torch.optim.SGD(param_groups(model, lr=0.01, weight_decay=5e-4), momentum=0.9)
    print(f"batch: images {tuple(images.shape)}, target {tuple(target.shape)} on {device}")

    for step in range(args.steps):
        t0 = time.perf_counter()
        out = model(images, target)
        loss, terms = criterion(out, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        dt = time.perf_counter() - t0
        if step == 0:
            print("forward outputs: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()))
            no_grad = [n for n, p in model.named_parameters() if p.grad is None]
            print(f"parameters without a gradient: {no_grad or 'none'}")
        loss_txt = ", ".join(f"{k} {v.item():.4f}" for k, v in terms.items())
        print(f"step {step}: {loss_txt}; forward+backward+step {dt * 1000:.0f} ms")

    model.eval()
    t0 = time.perf_counter()
    logits = predict_logits(model, images)
    cm = ConfusionMatrix(cfg.num_classes)
    cm.update(logits.argmax(1), target)
    print(
        f"eval: logits {tuple(logits.shape)} in {(time.perf_counter() - t0) * 1000:.0f} ms; "
        f"mIoU on the random batch {cm.miou():.4f}, pixel accuracy {cm.pixel_accuracy():.4f}"
    )


if __name__ == "__main__":
    main()
