"""The `vmap-sweep` command line: commands in app.py, what they print and draw in render.py.

Importing this package installs the command line's Ctrl-C handling before anything heavy loads (torch, the
plotting and Hub libraries take seconds to import): a Ctrl-C before a command's own code runs (while modules
import, or while typer builds the command line from its functions' annotations) ends the process at once with one
line, since a half-imported module would only fail later with a misleading traceback and nothing has run yet;
inside a command it is the KeyboardInterrupt the commands handle (a run keeps every stored batch and says how to
resume). Every write a command makes is atomic (SQLite transactions, files renamed into place), so ending at once
loses nothing stored.
"""

import os
import signal
import sys

__all__ = ["app", "main"]


_command_running = False  # set once a command's own code runs (app.py, user_errors)


def command_started() -> None:
    global _command_running
    _command_running = True


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupted(signum, frame) -> None:
    if not _command_running or _importing(frame):
        sys.stderr.write("error: interrupted (Ctrl-C) while vmap-sweep was loading; nothing stored changed\n")
        sys.stderr.flush()
        os._exit(130)
    raise KeyboardInterrupt


def _install() -> None:
    """The handler above, where Python's own is in place (never over a handler another program set)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, _interrupted)
        except ValueError:  # not the main thread: signals are not this thread's to handle
            pass


_install()


def main() -> None:
    """The console entry point. A value the parser can't take (`--levels abc`, an unknown option) is one `error:`
    line and exit 2, as every other error a user can cause; typer's own report of it is a six-line box."""
    import typer

    # click's exceptions, wherever this typer takes click from (its own copy since 0.26)
    click_errors = sys.modules[typer.BadParameter.__module__]
    no_args = getattr(click_errors, "NoArgsIsHelpError", ())
    try:
        code = __getattr__("app")(standalone_mode=False)
    except no_args as e:  # a bare group or command: its help
        e.show()
        code = e.exit_code
    except click_errors.UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "vmap-sweep"
        if e.ctx is None and len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
            command = f"vmap-sweep {sys.argv[1]}"  # an option's missing value comes without the command's context
        sys.stderr.write(f"error: {e.format_message().rstrip('.')}; see `{command} --help`\n")
        code = 2
    except click_errors.ClickException as e:
        sys.stderr.write(f"error: {e.format_message()}\n")
        code = e.exit_code
    except typer.Abort:
        sys.stderr.write("Aborted!\n")
        code = 1
    sys.exit(code if isinstance(code, int) else 0)


def __getattr__(name):
    if name == "app":
        from vmap_sweep.cli.app import app

        globals()["app"] = app  # the Typer app, not the submodule of the same name its import bound here
        return app
    raise AttributeError(name)
