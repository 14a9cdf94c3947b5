"""launch/diagnose.py: normal, training-graph and coarse-head mIoU of an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cdgcnet.config import ModelConfig
from cdgcnet.labels import CITYSCAPES
from cdgcnet.model import build_model
from launch.config import ConfigError, preset, to_dict
from launch.diagnose import diagnose, diagnose_run, main
from launch.evaluation import evaluate
from launch.export import save_exported
from pipeline.pack import main as pack_main
from pipeline.reader import EvalStream
from tests.launch.test_evaluation import write_val_set

M = CITYSCAPES.num_classes


@pytest.fixture(scope="module")
def val_split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diag")
    write_val_set(root / "src", n=4)
    args = ["cityscapes", "--src", str(root / "src"), "--out", str(root / "shards")]
    args += ["--splits", "val", "--workers", "1", "--no-progress"]
    assert pack_main(args) == 0
    return root / "shards" / "val"


def _model(**kw) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=M, depth=18, channels=16, aspp_channels=16, **kw)
    return build_model(cfg).eval()


def _cfg(split: Path, model: nn.Module):
    cfg = preset("scenes")
    cfg.data.root = str(split.parent)
    cfg.model = model.cfg
    return cfg


def _stream(split: Path):
    return lambda: EvalStream(split)


def _miou(model: nn.Module, split: Path) -> float:
    return evaluate(model, EvalStream(split), num_classes=M, progress=False).miou()


class _Spy:
    """Records, per CDGC forward, the target it got and the training flags that matter."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[dict] = []
        ctx = model.context

        def hook(module, args, _out):
            self.calls.append(
                {
                    "target": args[2],
                    "uses_target": module._uses_target(),
                    "bn_training": module.bn.training,
                    "model_training": model.training,
                }
            )

        # prepend: runs before diagnose()'s own forward hook puts the module back in eval mode.
        self.handle = ctx.register_forward_hook(hook, prepend=True)


@pytest.mark.parametrize("queries", ["members", "all"])
def test_training_graph_gets_the_labels_with_bn_in_eval_mode(val_split, queries):
    model = _model(graph="ds", queries=queries)
    bn_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    spy = _Spy(model)
    result = diagnose(model, _stream(val_split), _cfg(val_split, model), M, "cpu")
    spy.handle.remove()
    labels = [s["label"] for s in EvalStream(val_split)]
    # (a) 4 calls without a target, (b) 4 with each sample's own label, (c) 4 more without.
    assert [c["target"] is None for c in spy.calls] == [True] * 4 + [False] * 4 + [True] * 4
    for call, label in zip(spy.calls[4:8], labels, strict=True):
        assert torch.equal(call["target"], label) and call["uses_target"]
        assert not call["bn_training"] and not call["model_training"]
    assert not model.context.training and not model.training  # restored
    for k, v in model.state_dict().items():  # no BatchNorm statistic moved
        if "running" in k:
            assert torch.equal(v, bn_before[k]), k
    # (a) and (c) are the plain evaluations of the model and of its coarse prediction.
    assert result["normal"] == pytest.approx(_miou(model, val_split), abs=0)
    coarse_only = _model(graph="ds", queries=queries, context="none")
    coarse_only.load_state_dict(model.state_dict(), strict=False)
    assert result["coarse"] == pytest.approx(_miou(coarse_only, val_split), abs=0)
    assert result["lift"] == result["training_graph"] - result["normal"]
    assert result["refined_vs_coarse"] == result["normal"] - result["coarse"]


def test_sim_graph_has_no_lift(val_split):
    model = _model(graph="sim")
    result = diagnose(model, _stream(val_split), _cfg(val_split, model), M, "cpu")
    assert result["lift"] == 0.0 and result["training_graph"] == result["normal"]


def test_model_without_context_reports_normal_only(val_split):
    model = _model(context="none")
    result = diagnose(model, _stream(val_split), _cfg(val_split, model), M, "cpu")
    assert result["normal"] == pytest.approx(_miou(model, val_split), abs=0)
    assert result["training_graph"] is None and result["lift"] is None


def test_multi_scale_or_flip_is_refused(val_split):
    model = _model()
    cfg = _cfg(val_split, model)
    cfg.eval.flip = True
    with pytest.raises(ConfigError, match="whole-image, single-scale, no-flip"):
        diagnose(model, _stream(val_split), cfg, M, "cpu")


def test_cli_on_an_exported_model(val_split, tmp_path, capsys):
    model = _model(graph="ds", queries="all")
    cfg = _cfg(val_split, model)
    save_exported(model.state_dict(), to_dict(cfg), tmp_path / "model.pt")
    out_json = tmp_path / "diag.json"
    args = ["--checkpoint", str(tmp_path / "model.pt"), "--json", str(out_json)]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result == diagnose_run(tmp_path / "model.pt")
    assert f"normal: {result['normal']:.4f}" in printed and "lift:" in printed
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--no-progress"]) == 2
    assert "missing.pt" in capsys.readouterr().err
