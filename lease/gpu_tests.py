"""Stage gpu_tests: `pytest -m gpu tests/cdgcnet` in a child, each test's outcome recorded as
its line appears (a per-test timeout where pytest-timeout is installed). A failing CUDA test is
a finding, counted here, not a failure of the stage."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from typing import Any

from lease import ROOT
from lease.context import Ctx
from lease.results import record

_TEST_LINE = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR|SKIPPED) (?:\[\d+\] )?(tests/\S+?)(?: - (.*))?$")


def stage_gpu_tests(ctx: Ctx) -> None:
    per_test = 90 if not ctx.dry_run else 30
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfEs", "-p", "no:cacheprovider", "-m", "gpu"]
    cmd += ["tests/cdgcnet"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={per_test}"]
    else:
        per_test = None
    tests: dict[str, dict[str, Any]] = {}
    record(ctx.out, "gpu_tests", {"command": " ".join(cmd[1:]), "per_test_timeout_s": per_test})
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        m = _TEST_LINE.match(line)
        if m:
            tests[m.group(1)] = {"outcome": m.group(2)}
            record(ctx.out, "gpu_tests", {"tests": tests})
        m = _SUMMARY_LINE.match(line.strip())
        if m and m.group(2) in tests and m.group(3):
            tests[m.group(2)]["message"] = m.group(3)[:300]
    code = proc.wait()
    counts: dict[str, int] = {}
    for t in tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    record(ctx.out, "gpu_tests", {"tests": tests, "counts": counts, "pytest_exit_code": code})
