"""Host-device syncs in the training step, counted on CPU.

On a GPU each of these calls makes the host wait for the device: a scalar read (item, bool,
int, float, tolist, numpy, cpu) or an op whose output shape depends on the data (nonzero,
masked_select, boolean-mask indexing, unique). The CPU runs none of them as a sync, so this
records the calls themselves, at the Python level (TorchFunctionMode) and at the aten level
(TorchDispatchMode, which also sees the backward pass), and names the project line that made
each one. The GPU twin of this test (tests/cdgcnet/test_gpu.py) uses CUDA's own sync check.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from cdgcnet.config import ModelConfig
from cdgcnet.losses import CDGCLoss, ohem_cross_entropy
from cdgcnet.model import build_model

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cdgcnet", "launch", "pipeline")

SCALAR_READS = {"tolist", "item", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"}
DATA_SHAPED_OPS = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


def _caller() -> str:
    """'path:function' of the innermost project frame on the stack."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_relative_to(ROOT) and path.relative_to(ROOT).parts[0] in PACKAGES:
            return f"{path.relative_to(ROOT).as_posix()}:{frame.name}"
    return "outside the project"


class _Reads(TorchFunctionMode):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SCALAR_READS:
            self.log.append((name, _caller()))
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op = func.overloadpacket.__name__
        bool_index = op == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if op in DATA_SHAPED_OPS or bool_index:
            self.log.append((op, _caller()))
        return func(*args, **(kwargs or {}))


def record_syncs(fn, *args) -> list[tuple[str, str]]:
    """(call, 'path:function') for each sync-making call that fn(*args) runs."""
    log: list[tuple[str, str]] = []
    with _Reads(log), _Ops(log):
        fn(*args)
    return log


def _step(model, criterion, images, target) -> None:
    outputs = model(images, target)
    loss, _ = criterion(outputs, target)
    loss.backward()


def _setup(**model_kw):
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=5, depth=18, channels=16, aspp_channels=16, **model_kw)
    model = build_model(cfg).train()
    images = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, 5, (2, 64, 64))
    target[:, :6] = 255
    return model, images, target


LAYOUT_SYNC = [("tolist", "cdgcnet/cdgc/layout.py:build_layout")]


@pytest.mark.parametrize(
    "model_kw",
    [
        {},
        {"checkpoint": True},
        {"graph": "sim"},
        {"fusion": "sum", "aux": False},
        {"queries": "members"},
        {"queries": "masked"},
    ],
    ids=["ds", "ds-checkpointed", "sim", "sum-no-aux", "members", "masked"],
)
def test_training_step_syncs_once_in_the_cdgc_layout(model_kw):
    # OHEM's min_kept below and above the hard count both run the same ops.
    for min_kept in (10, 5000):
        model, images, target = _setup(**model_kw)
        criterion = CDGCLoss(ohem_min_kept=min_kept, check_labels=False)
        assert record_syncs(_step, model, criterion, images, target) == LAYOUT_SYNC


@pytest.mark.parametrize("precision", ["split", "fp32", "autocast"])
def test_cdgc_under_bf16_autocast_syncs_once_in_every_precision(precision):
    # The precision policies act under autocast only; none adds a read.
    model, images, target = _setup(cdgc_precision=precision)
    criterion = CDGCLoss(ohem_min_kept=10, check_labels=False)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model(images, target)
            loss, _ = criterion(outputs, target)
        loss.backward()

    assert record_syncs(step) == LAYOUT_SYNC


def test_dense_reads_the_bad_label_count_instead():
    # impl="dense" builds no layout; its one read is the bad-label count.
    model, images, target = _setup(impl="dense")
    criterion = CDGCLoss(ohem_min_kept=10, check_labels=False)
    log = record_syncs(_step, model, criterion, images, target)
    assert log == [("__int__", "cdgcnet/cdgc/module.py:forward")]


def test_the_recorder_sees_label_checks_and_boolean_indexing():
    # The same step with the label check on, and the old OHEM's boolean gather: both counted.
    model, images, target = _setup()
    criterion = CDGCLoss(ohem_min_kept=10, check_labels=True)
    log = record_syncs(_step, model, criterion, images, target)
    assert log == [*LAYOUT_SYNC, ("__bool__", "cdgcnet/losses.py:validate_labels")]
    x = torch.randn(10)
    assert record_syncs(x.__getitem__, x > 0) == [("index", "outside the project")]


def test_plain_gcn_and_baseline_steps_sync_only_for_the_layout():
    model, images, target = _setup(context="plain_gcn")
    criterion = CDGCLoss(ohem_min_kept=10, check_labels=False)
    assert record_syncs(_step, model, criterion, images, target) == LAYOUT_SYNC
    model, images, target = _setup(context="none")
    assert record_syncs(_step, model, criterion, images, target) == []


def test_ohem_is_sync_free_in_every_regime():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randint(0, 4, (2, 16, 16))
    target[0, :4] = 255
    for min_kept in (0, 1, 50, 10**6):
        loss = ohem_cross_entropy(logits, target, 0.7, min_kept, check_labels=False)
        assert record_syncs(ohem_cross_entropy, logits, target, 0.7, min_kept, 255, False) == []
        assert record_syncs(loss.backward) == [], min_kept
