"""Calling the CLI in-process from tests."""

from typer.testing import CliRunner

from vmap_sweep.cli import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result
