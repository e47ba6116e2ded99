"""The `vmap-sweep` command line: commands in app.py, what they print and draw in render.py."""

from vmap_sweep.cli.app import app

__all__ = ["app"]
