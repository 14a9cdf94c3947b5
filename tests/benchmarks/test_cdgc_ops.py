"""The CDGC module's operation count does not grow with the number of classes (issue 19's CPU
goal), measured as benchmarks/cdgc_ops.py measures it."""

from __future__ import annotations

import pytest

from benchmarks import cdgc_ops
from cdgcnet.cdgc import QUERIES


def test_ops_at_171_classes_within_the_goal_of_ops_at_19() -> None:
    few = cdgc_ops.measure(19, iters=0)
    many = cdgc_ops.measure(171, iters=0)
    assert few["classes_per_image"] == [19, 19] and min(many["classes_per_image"]) >= 160
    assert many["ops"] <= cdgc_ops.GOAL * few["ops"], (few["ops"], many["ops"])


@pytest.mark.parametrize("queries", QUERIES)
def test_ops_do_not_depend_on_the_classes_in_any_reading(queries: str) -> None:
    counts = [cdgc_ops.measure(m, queries, shape=cdgc_ops.SMOKE_SHAPE, iters=0) for m in (5, 60)]
    assert min(counts[1]["classes_per_image"]) > 30  # the classes really are there
    assert counts[1]["ops"] == counts[0]["ops"]


def test_the_counter_sees_a_per_class_loop() -> None:
    # The counter is not blind to what the goal forbids: in float64 the fast path's grouped
    # products run one class at a time (torch's grouped_mm takes float32 and bf16 only).
    few = cdgc_ops.measure(5, "all", shape=cdgc_ops.SMOKE_SHAPE, iters=0, dtype="float64")
    many = cdgc_ops.measure(60, "all", shape=cdgc_ops.SMOKE_SHAPE, iters=0, dtype="float64")
    assert many["ops"] > 2 * few["ops"]
