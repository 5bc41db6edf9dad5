"""Shared helpers of the CLI tests: run ``pegq`` in-process and check the one-line error contract."""

from __future__ import annotations

from typer.testing import CliRunner

from pegq.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def one_line_error(res, *needles):
    assert res.exit_code == 2, (res.exit_code, res.output)
    text = res.output.strip()
    assert text.startswith("error:"), text
    assert len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, (n, text)
