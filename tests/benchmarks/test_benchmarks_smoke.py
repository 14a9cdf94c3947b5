"""Each benchmark script runs end to end at a tiny size (--smoke) and writes valid JSON records.

These check the scripts, not the figures: timings here mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses and a torchrun launch: ~40 s of CPU in all


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    assert data["hardware"]["cpu_cores"] >= 1
    assert data["command"].startswith("python benchmarks/")
    return data


def test_train_step_smoke(tmp_path: Path) -> None:
    from benchmarks import train_step

    out = tmp_path / "train_step.json"
    assert train_step.main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    data = _load(out)
    assert data["gpu_rows"] == "not measured (no GPU in this environment)"
    rows = {r["case"]: r for r in data["records"]}
    for case in ("cdgc", "cdgc_ckpt", "baseline", "cdgc_nchw"):
        r = rows[case]
        assert r["step_ms"] > 0 and r["images_per_s"] > 0
        assert r["memory_status"] == "ok" and r["peak_mem_mb"] > 0
        assert r["gflop_per_step"] > 0
    assert rows["baseline"]["time_vs_baseline"] == 1.0
    # The CDGC branch adds work: its products and per-class grouped products are counted.
    assert rows["cdgc"]["gflop_per_step"] > rows["baseline"]["gflop_per_step"]
    assert "aten._grouped_mm" in rows["cdgc"]["flop_ops"]
    assert rows["torchvision"]["status"].startswith("skipped")


def test_cdgc_scaling_smoke(tmp_path: Path) -> None:
    from benchmarks import cdgc_scaling

    out = tmp_path / "scaling.json"
    assert cdgc_scaling.main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    data = _load(out)
    recs = data["records"]
    assert {(r["impl"], r["S"]) for r in recs} == {
        (i, s) for i in ("dense", "fast") for s in cdgc_scaling.SMOKE_SIDES
    }
    for r in recs:
        assert r["status"] == "ok", r
        assert r["queries"] == "all"  # the model's default reading
        assert r["fwd_bwd_ms"] > 0 and r["peak_mem_mb"] >= 0
        # Every labelled pixel is in at least one node set; sum |V|^2 lies between T^2/M and T^2.
        assert r["T"] >= r["N"] * 0.8
        assert r["T"] ** 2 / r["M"] <= r["sum_V2"] <= r["T"] ** 2
        assert r["N_T"] == r["N"] * r["T"]
    assert {f["impl"] for f in data["fits"]} == {"dense", "fast"}

    # A dense budget of zero skips dense with the reason recorded.
    out2 = tmp_path / "scaling2.json"
    args = ["--smoke", "--device", "cpu", "--no-memory", "--dense-budget-gb", "0"]
    assert cdgc_scaling.main([*args, "--json", str(out2)]) == 0
    dense = [r for r in _load(out2)["records"] if r["impl"] == "dense"]
    assert dense and all(r["status"].startswith("does not fit") for r in dense)


def test_inference_smoke(tmp_path: Path) -> None:
    from benchmarks import inference

    out = tmp_path / "inference.json"
    assert inference.main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    rows = {r["case"]: r for r in _load(out)["records"]}
    # 64x128 image, crop 65, stride 43: 1 x 3 windows; scale 0.75 (48x96): 1 x 2; flipped twice.
    assert rows["whole"]["forward_passes"] == 1
    assert rows["slide"]["forward_passes"] == 3
    assert rows["slide_ms_flip"]["forward_passes"] == (2 + 3) * 2
    assert all(r["images_per_s"] > 0 for r in rows.values())


def test_deepspeed_stages_smoke(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    from benchmarks import deepspeed_stages

    out = tmp_path / "ds.json"
    assert deepspeed_stages.main(["--smoke", "--worlds", "1", "--json", str(out)]) == 0
    rows = _load(out)["records"]
    assert [r["variant"] for r in rows] == ["plain", "zero1", "zero2", "zero3"]
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in rows)
    assert rows[0]["overhead_pct"] == 0.0


def test_ohem_loss_smoke(tmp_path: Path) -> None:
    from benchmarks import ohem_loss

    out = tmp_path / "ohem.json"
    assert ohem_loss.main(["--smoke", "--device", "cpu", "--json", str(out)]) == 0
    rows = _load(out)["records"]
    assert [(r["regime"], r["impl"]) for r in rows] == [
        (regime, impl) for regime in ("early", "late") for impl in ohem_loss.IMPLS
    ]
    assert all(r["median_ms"] > 0 and r["peak_mb"] >= 0 for r in rows)
    assert all(r["time_vs_gather"] > 0 for r in rows if r["impl"] == "masked")


def test_cdgc_ops_smoke(tmp_path: Path) -> None:
    from benchmarks import cdgc_ops

    out = tmp_path / "ops.json"
    args = ["--smoke", "--classes", "5", "40", "--iters", "1", "--json", str(out)]
    assert cdgc_ops.main(args) == 0
    data = _load(out)
    rows = {(r["queries"], r["M"]): r for r in data["records"]}
    assert set(rows) == {(q, m) for q in ("all", "members", "masked") for m in (5, 40)}
    for q in ("all", "members", "masked"):
        assert rows[q, 40]["ops"] == rows[q, 5]["ops"] > 0
        assert rows[q, 40]["ops_vs_fewest_classes"] == 1.0 and rows[q, 5]["fwd_bwd_ms"] > 0


def test_cdgc_module_smoke(tmp_path: Path) -> None:
    from benchmarks import cdgc_module

    out = tmp_path / "module.json"
    assert cdgc_module.main(["--smoke", "--iters", "1", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())
    assert [(r["impl"], r["checkpoint"]) for r in recs] == cdgc_module.VARIANTS
    for r in recs:
        assert r["status"] == "ok", r
        assert (r["queries"], r["precision"]) == ("all", "split")  # the model's defaults
        assert r["fwd_bwd_ms"] > 0 and r["peak_mem_mb"] >= 0
        assert r["memberships_per_node"] >= 0.8
