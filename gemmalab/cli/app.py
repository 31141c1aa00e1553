"""The typer app and the one failure policy every command shares.

Every expected failure ends the same way, whatever the command: one line on stderr that names the problem
and the fix, and a non-zero exit code, never a traceback (``--debug`` shows it):

* a gemmalab error (``GemmalabError``: bad input, a missing file, a checkpoint that does not fit): exit 1;
* a usage error that click finds itself (an unknown option, a value that is not a number): exit 2;
* an operating-system error that escaped the library's own checks (a full disk, say): exit 1, naming the path;
* Ctrl-C: exit 130, with what was kept (a training run says which checkpoint and how to resume).

Warnings from the library (``warnings.warn``) print as ``warning: ...`` lines. Commands register themselves
on ``app`` from the modules of this package; none of them imports an array framework until it runs.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Annotated

import typer
from rich.console import Console

try:  # typer >= 0.25 carries its own copy of click; earlier versions use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as click_errors

from .. import __version__
from ..errors import GemmalabError

app = typer.Typer(
    name="gemmalab",
    help="Gemma 3 research toolkit: exact models on MLX, PyTorch and JAX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_debug = {"on": False}

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _version(value: bool) -> None:
    if value:
        console.print(f"gemmalab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of a failure.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    _debug["on"] = debug or os.environ.get("GEMMALAB_DEBUG") == "1"


def error_line(message: str) -> None:
    """Print one failure line on stderr, never wrapped (a path in it must stay copyable)."""
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True, style="red")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True, style="yellow")


def _interrupt_message(err: BaseException) -> str:
    # A training run stopped by Ctrl-C says what it kept and how to go on (gemmalab.errors.RunInterrupted).
    return str(err) if str(err) else "interrupted (Ctrl-C)"


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would turn it into a silent exit 130)."""


def _reported(function):
    """``function`` with Ctrl-C inside it reported by ``main`` (see the module docstring)."""

    @functools.wraps(function)  # typer reads the signature and annotations through __wrapped__
    def run(*call_args, **call_kwargs):
        try:
            return function(*call_args, **call_kwargs)
        except KeyboardInterrupt as err:
            if _debug["on"]:
                raise
            raise _Interrupted(_interrupt_message(err)) from None

    return run


def command(*args, on: typer.Typer | None = None, **kwargs):
    """``app.command`` (or ``on.command`` for a command group, see ``group``), with Ctrl-C inside the
    command reported by ``main`` (see the module docstring). Every gemmalab command registers through this."""

    def register(function):
        return (on or app).command(*args, **kwargs)(_reported(function))

    return register


def group(name: str, help: str, run=None) -> typer.Typer:  # noqa: A002  (typer's own word)
    """A group of subcommands, ``gemmalab NAME ...``; register its commands with ``command(on=group)``.
    ``run``: a command of its own for ``gemmalab NAME [OPTIONS]`` with no subcommand (it receives the typer
    context first, and returns at once when a subcommand was named)."""
    sub = typer.Typer(name=name, help=help, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                      invoke_without_command=run is not None)
    if run is not None:
        sub.callback(invoke_without_command=True)(_reported(run))
    app.add_typer(sub, name=name)
    return sub


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: run the app under the failure policy in this module's docstring."""
    warnings.showwarning = _show_warning
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="gemmalab", standalone_mode=False)
    except GemmalabError as err:
        if _debug["on"]:
            raise
        error_line(str(err))
        code = EXIT_FAILURE
    except _Interrupted as err:
        error_line(str(err))
        code = EXIT_INTERRUPTED
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command (while parsing, say)
        error_line("interrupted (Ctrl-C)")
        code = EXIT_INTERRUPTED
    except click_errors.NoArgsIsHelpError as err:  # `gemmalab` or `gemmalab lora` alone: the help page
        err.show()
        code = err.exit_code
    except click_errors.ClickException as err:  # usage errors: bad option names or values
        ctx = getattr(err, "ctx", None)
        error_line(f"{err.format_message()} (see `{ctx.command_path if ctx else 'gemmalab'} --help`)")
        code = err.exit_code
    except OSError as err:  # the library checks its paths first; this is the backstop (a disk that filled up)
        if _debug["on"]:
            raise
        where = f"{err.filename}: " if err.filename else ""
        error_line(f"{where}{err.strerror or err} (run again with --debug for the traceback)")
        code = EXIT_FAILURE
    sys.exit(code if isinstance(code, int) else 0)
