"""Evaluation throughput of cdgcnet.inference.predict_logits: sliding window and MS + flip.

    python benchmarks/inference.py [--setting auto|paper|cpu] [--cases ...] [--iters N]
                                   [--json PATH] [--smoke]

Cases, side by side in one run (their calls take turns):
- slide:         one scale, crop windows every `stride` pixels
- slide_ms_flip: scales 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, each also flipped (12 passes), the
                 paper's MS/Flip evaluation; softmax probabilities averaged
- whole:         one forward over the whole image (reference)
The model is in eval mode (CDGC node sets from the coarse prediction), batch 1.

CUDA: the Cityscapes model (ResNet-101 OS8, ASPP + CDGC, 19 classes) on 1024x2048 images,
crop 769, stride 513, bf16 autocast; images/s from CUDA-event times.
CPU (reduced, stated in every record): the cpu_small model (ResNet-18, 64 channels) on 256x512
images, crop 129, stride 86, fp32. --smoke: 64x128 images, crop 65, stride 43, MS scales
0.75 and 1.0 only. --setting paper runs the CUDA setting on either device (on CPU in fp32:
about half a minute per sliding-window image on one core; --cases slide whole leaves out the
12-pass MS + flip case).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout

import torch

from benchmarks import common

CASES = ("whole", "slide", "slide_ms_flip")
SETTINGS: dict[str, dict[str, Any]] = {
    "cuda": dict(model="cityscapes", height=1024, width=2048, crop=769, stride=513),
    "cpu": dict(model="cpu_small", height=256, width=512, crop=129, stride=86),
    "smoke": dict(model="cpu_small", height=64, width=128, crop=65, stride=43, scales=(0.75, 1.0)),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per case (CPU 3, CUDA 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per case (>= 1)")
    ap.add_argument("--smoke", action="store_true", help="tiny image (script check)")
    ap.add_argument(
        "--setting",
        default="auto",
        choices=["auto", "paper", "cpu"],
        help="auto: paper on CUDA, the reduced case on CPU; paper: R-101 at 1024x2048 anywhere",
    )
    ap.add_argument(
        "--cases",
        nargs="+",
        default=list(CASES),
        choices=CASES,
        help="which cases to run (default: all)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from cdgcnet.config import model_preset
    from cdgcnet.inference import MS_SCALES, predict_logits
    from cdgcnet.model import build_model

    device = common.pick_device(args.device)
    cuda = device.type == "cuda"
    setting = {"auto": device.type, "paper": "cuda", "cpu": "cpu"}[args.setting]
    st = SETTINGS["smoke" if args.smoke else setting]
    paper = st is SETTINGS["cuda"]
    iters = args.iters if args.iters is not None else (1 if args.smoke else (5 if cuda else 3))
    torch.manual_seed(0)
    cfg = model_preset(st["model"])
    model = build_model(cfg).to(device).eval()
    images = torch.randn(
        1, 3, st["height"], st["width"], generator=torch.Generator().manual_seed(1)
    )
    images = images.to(device)
    slide = dict(mode="slide", crop=st["crop"], stride=st["stride"])
    cases = {
        "whole": dict(mode="whole"),
        "slide": slide,
        "slide_ms_flip": dict(slide, scales=st.get("scales", MS_SCALES), flip=True),
    }
    cases = {k: v for k, v in cases.items() if k in args.cases}
    passes = {}

    def runner(kw: dict[str, Any]):
        def call() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                out = predict_logits(model, images, **kw)
            assert out.shape == (1, cfg.num_classes, st["height"], st["width"])

        return call

    # The first warm-up call of each case also counts its forward passes (windows).
    counter = [0]
    handle = model.register_forward_pre_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
    for name, kw in cases.items():
        counter[0] = 0
        runner(kw)()
        passes[name] = counter[0]
    handle.remove()

    hw = common.hardware(device)
    print(f"hardware: {hw}")
    times = common.interleaved_times(
        {k: runner(v) for k, v in cases.items()}, device, max(args.warmup - 1, 0), iters
    )
    rows = []
    for name, kw in cases.items():
        t = common.summary(times[name])
        rows.append(
            dict(
                case=name,
                device=device.type,
                dtype="bf16 autocast" if cuda else "fp32",
                model=st["model"],
                depth=cfg.depth,
                channels=cfg.channels,
                image=f"{st['height']}x{st['width']}",
                crop=st["crop"] if name != "whole" else None,
                stride=st["stride"] if name != "whole" else None,
                scales=list(kw.get("scales", (1.0,))),
                flip=kw.get("flip", False),
                forward_passes=passes[name],
                ms_per_image=t["median_ms"],
                ms_min=t["min_ms"],
                ms_max=t["max_ms"],
                iters=t["n"],
                images_per_s=round(1e3 / t["median_ms"], 4),
                reduced="" if paper else "reduced image and depth-18 model (not the paper's)",
            )
        )
    cols = ["case", "model", "image", "crop", "stride", "forward_passes", "ms_per_image"]
    common.print_table(rows, [*cols, "images_per_s"], title="evaluation throughput (batch 1)")
    if args.json:
        common.write_results(args.json, "inference", argv, hw, rows, gpu_rows=common.gpu_rows(cuda))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
