"""benchmarks/cdgc_readings.py runs end to end at a tiny size and records the three readings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # four subprocesses: ~20 s of CPU


def test_cdgc_readings_smoke(tmp_path: Path) -> None:
    from benchmarks import cdgc_readings

    out = tmp_path / "readings.json"
    assert (
        cdgc_readings.main(["--smoke", "--device", "cpu", "--iters", "1", "--json", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    assert data["command"].startswith("python benchmarks/cdgc_readings.py")
    rows = {(r["queries"], r["checkpoint"]): r for r in data["records"]}
    assert set(rows) == {("all", False), ("members", False), ("masked", False), ("all", True)}
    for r in rows.values():
        assert r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["infer_ms"] > 0
        assert r["peak_mem_mb"] is not None and r["infer_peak_mem_mb"] is not None
    # Every node queries every class: N * sum |V_m| pairs, more than sum |V_m|^2; the fast path
    # computes those N * sum |V_m| scores for every reading.
    b, h, w = (rows[("all", False)][k] for k in "BHW")
    assert rows[("all", False)]["attention_pairs"] > rows[("members", False)]["attention_pairs"]
    assert rows[("all", False)]["attention_pairs"] % (h * w) == 0 and b == 1
    assert rows[("masked", False)]["attention_pairs"] == rows[("all", False)]["attention_pairs"]
    assert {r["scores"] for r in rows.values()} == {rows[("all", False)]["attention_pairs"]}
