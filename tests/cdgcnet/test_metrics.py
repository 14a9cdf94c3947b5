import math

import numpy as np
import pytest
import torch

from cdgcnet.metrics import ConfusionMatrix

PRED = torch.tensor([[0, 0, 1, 1], [2, 2, 1, 0], [0, 1, 1, 1]])
TARGET = torch.tensor([[0, 0, 1, 1], [2, 1, 1, 255], [255, 2, 1, 0]])


def test_hand_computed_values():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    # rows = target, cols = pred; the two ignore pixels are not counted.
    expected = np.array([[2, 1, 0, 0], [0, 4, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(cm.mat, expected)
    # IoU = tp / (row + col - tp): class 0: 2 / (3 + 2 - 2); 1: 4 / (5 + 6 - 4); 2: 1 / (2 + 2 - 1)
    np.testing.assert_allclose(cm.iou()[:3], [2 / 3, 4 / 7, 1 / 3])
    assert math.isnan(cm.iou()[3])  # never in pred nor target
    assert cm.miou() == pytest.approx((2 / 3 + 4 / 7 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(7 / 10)


def test_merge_of_halves_equals_whole_and_tensor_round_trip():
    torch.manual_seed(0)
    pred = torch.randint(0, 5, (4, 9, 7))
    target = torch.randint(0, 5, (4, 9, 7))
    target[target == 4] = 255
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(pred[:2], target[:2])
    b.update(pred[2:].numpy(), target[2:].numpy())
    assert a.merge(b) is a
    np.testing.assert_array_equal(a.mat, whole.mat)
    t = whole.as_tensor()
    assert t.dtype == torch.int64 and t.shape == (5, 5)
    back = ConfusionMatrix.from_tensor(t + t)
    np.testing.assert_array_equal(back.mat, 2 * whole.mat)
    assert back.miou() == pytest.approx(whole.miou())
    whole.reset()
    assert whole.mat.sum() == 0 and math.isnan(whole.miou())


def test_bad_inputs_are_named():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="differ in shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target holds ids outside \[0, 3\).*\[5\]"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([5, 255]))
    with pytest.raises(ValueError, match="pred holds ids"):
        cm.update(torch.tensor([3, 0]), torch.tensor([1, 255]))
    with pytest.raises(ValueError, match="merge a 4-class"):
        cm.merge(ConfusionMatrix(4))
