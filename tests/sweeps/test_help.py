"""The sweep CLIs document every option, with its default."""

from __future__ import annotations

import pytest


def _help(capsys, parse) -> str:
    with pytest.raises(SystemExit):
        parse(["--help"])
    return " ".join(capsys.readouterr().out.split())


def test_ratio_sweep_help_explains_search_concurrency_retries_and_joining(capsys) -> None:
    from sweeps.ratio_sweep import parse_args

    text = _help(capsys, parse_args)
    assert "grid: every ratio x fusion" in text and "random: ratio, fusion and loss weights" in text
    assert "--max-concurrent MAX_CONCURRENT trials running at once" in text
    assert "retries per training run (default 2)" in text
    assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN" in text  # joining a cluster needs its token
