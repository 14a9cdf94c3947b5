"""Does a trained CDGCNet's refined head read the training graph? Three val mIoUs of one model.

    python launch/diagnose.py --checkpoint runs/scenes/model.pt
    python launch/diagnose.py --checkpoint runs/scenes --split val --json diag.json

(a) normal inference (what launch/evaluate.py reports);
(b) the graph built as in training: the CDGC module is given the ground truth and builds its node
    sets as in training (graph="ds": eq. 4 with the model's ratio and parts), while every
    BatchNorm and Dropout stays in eval mode;
(c) the coarse head alone (the refined head's input prediction).

lift = (b) - (a): how much the refined head gains from ground-truth node membership it cannot
have at inference (near zero when the graph does not leak the labels); refined_vs_coarse =
(a) - (c): what the context module adds over the prediction it refines. A model without a
context module reports (a) only. Whole-image, single-scale, no-flip evaluation (eval.mode,
eval.scales and eval.flip of the run's config must say so), as the training graph needs the
label of exactly the image the model sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import Tensor, nn

from launch.config import ConfigError, from_dict
from launch.export import CheckpointError, load_checkpoint


class _CoarseHead(nn.Module):
    """The coarse prediction of a CDGCNet as its only output (final_logits then picks it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return {"coarse": self.model(images)["coarse"]}


def _with_labels(stream: Iterable[dict], current: dict) -> Iterator[dict]:
    """The stream's samples, each label kept in `current` while its sample is evaluated."""
    for sample in stream:
        current["label"] = sample["label"]
        yield sample


def diagnose(
    model: nn.Module, stream_factory, cfg, num_classes: int, device, progress: bool = False
) -> dict:
    """The three mIoUs of one model on the split `stream_factory()` yields (a fresh stream each).

    model: a CDGCNet; cfg: its TrainConfig (cfg.eval says how to evaluate); returns
    {"normal", "training_graph", "coarse", "lift", "refined_vs_coarse"} (None where the model
    has no context module).
    """
    from launch.evaluation import evaluate_run

    e = cfg.eval
    if e.mode != "whole" or tuple(e.scales) != (1.0,) or e.flip:
        raise ConfigError(
            "launch/diagnose.py: the training graph needs whole-image, single-scale, no-flip "
            f"evaluation, got eval.mode={e.mode!r} eval.scales={tuple(e.scales)} eval.flip={e.flip}"
        )
    model = model.to(device).eval()

    def miou(net: nn.Module, stream: Iterable[dict]) -> float:
        return evaluate_run(net, stream, cfg, num_classes, device, progress).miou()

    result = {"normal": miou(model, stream_factory())}
    context = getattr(model, "context", None)
    if context is None:
        return {**result, "training_graph": None, "coarse": None, "lift": None,
                "refined_vs_coarse": None}  # fmt: skip
    current: dict = {}

    def give_target(module, args):  # (x, coarse_logits, target) -> target = the ground truth
        # Only the module's own flag (evaluate() puts the whole model in eval mode first): it
        # builds its node sets as in training, while its BN (a child) and every other layer stay
        # in eval mode. The model passes no target in eval mode, so the hook hands over the
        # label of the sample evaluate() is predicting.
        module.training = True
        return (args[0], args[1], current["label"].to(args[0].device))

    def back_to_eval(module, _args, _out):
        module.training = False

    hooks = [
        context.register_forward_pre_hook(give_target),
        context.register_forward_hook(back_to_eval),
    ]
    try:
        torch.manual_seed(0)  # the Bernoulli sample of the easy positives when ratio < 1
        result["training_graph"] = miou(model, _with_labels(stream_factory(), current))
    finally:
        context.training = False
        for hook in hooks:
            hook.remove()
    coarse_head = _CoarseHead(model).eval()  # eval: evaluate() restores the wrapper's mode
    result["coarse"] = miou(coarse_head, stream_factory())
    result["lift"] = result["training_graph"] - result["normal"]
    result["refined_vs_coarse"] = result["normal"] - result["coarse"]
    return result


def diagnose_run(checkpoint: str | Path, split: str | None = None, progress: bool = False) -> dict:
    """diagnose() of a model.pt (or anything launch/evaluate.py loads) with its run's config."""
    from cdgcnet.labels import LABEL_SPECS
    from pipeline.reader import EvalStream

    model, cfg_dict, _ = load_checkpoint(checkpoint)
    try:
        cfg = from_dict(cfg_dict)
    except ConfigError as e:
        raise CheckpointError(f"{checkpoint}: its config is not valid: {e}") from e
    split_dir = Path(cfg.data.root) / (split or cfg.data.val_split)

    def stream():
        return EvalStream(split_dir, num_workers=0, on_corrupt=cfg.data.on_corrupt)

    num_classes = LABEL_SPECS[cfg.dataset].num_classes
    result = diagnose(model, stream, cfg, num_classes, torch.device("cpu"), progress)
    return {**result, "checkpoint": str(checkpoint), "split": str(split_dir)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="launch/diagnose.py",
        description="Val mIoU of a trained CDGCNet with normal inference, with the graph built "
        "as in training (ground truth given), and of its coarse head alone.",
    )
    p.add_argument("--checkpoint", required=True, help="model.pt, run dir or DeepSpeed checkpoint")
    p.add_argument("--split", help="split to evaluate (default data.val_split of the run)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        result = diagnose_run(args.checkpoint, args.split, not args.no_progress)
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for key in ("normal", "training_graph", "coarse", "lift", "refined_vs_coarse"):
        value = result[key]
        print(f"{key:>18}: {'-' if value is None else f'{value:.4f}'}")
    if args.json:
        from launch.visualize import write_atomic

        write_atomic(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
