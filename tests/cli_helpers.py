"""Calling the CLI in-process from tests."""

from typer.testing import CliRunner

from vmap_sweep.cli import app


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok(*args):
    result = cli(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def boundary_pixels(study_dir) -> int:
    """Boundary pixels of a finished study, counted from its stored labels the plain way (a 2x2 block holding
    both classes), independent of vmap_sweep.analysis: the box count at size 1 must equal it."""
    import numpy as np

    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study_dir) as store:
        converged = store.labels_array() == "converged"
    blocks = np.stack([converged[:-1, :-1], converged[1:, :-1], converged[:-1, 1:], converged[1:, 1:]])
    return int((blocks.any(0) & ~blocks.all(0)).sum())
