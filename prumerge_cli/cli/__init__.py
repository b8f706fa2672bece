"""The `prumerge` command line: compress, inspect (and more as they land)."""

from __future__ import annotations

import os
import sys
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, get_args

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import Abort, Exit, TyperException

from ..errors import PrumergeError

app = typer.Typer(
    name="prumerge",
    help="Reduce the visual tokens of LLaVA-style models, export the result, and benchmark it.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"prumerge {version('prumerge')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    """Reduce the visual tokens of LLaVA-style models, export the result, and benchmark it."""


def _register() -> None:
    from . import bench, compress, convert, demo, evaluate, export, generate, inspect_images, world  # noqa: F401  (commands register themselves on `app`)


def quiet_transformers() -> None:
    """No per-file progress bars or info logs from transformers inside our own output (through its environment
    variables, so that nothing imports transformers before a command needs it)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already loaded: the variables were read, so tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    # peft still asks for a property transformers 5 has renamed; the warning says nothing to a user of prumerge
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


METAVARS = {int: "N", float: "X", Path: "PATH", str: "TEXT"}
"""What help shows for an option's value, by its type (instead of Typer's `<int>`, `<list[str]>`, ...)."""


def plain_metavars(command: Any) -> None:
    """Name every value in help as a user reads it: arguments by their name in capitals (MODEL_DIR, TARGETS...),
    option values by kind (N, X, PATH, TEXT) without their range; flags show none, and their `--no-X` form only
    where X is on by default. (Typer's click-like classes, by their kind.)"""
    for sub in getattr(command, "commands", {}).values():
        sub.get_help_option = lambda ctx, made=sub.get_help_option: without_type(made(ctx))
        for param in sub.params:
            if param.param_type_name == "argument":  # typer's usage line shows {name}, its help column <type>
                param.metavar = param.name.upper() + ("..." if param.nargs == -1 else "")
                shown = param.metavar if param.required else f"[{param.metavar}]"
                param._usage_display_name = lambda shown=shown: shown
                param.display_type_rich = lambda ctx: None
            elif param.param_type_name == "option" and param.is_flag:  # no <bool>; --no-X only where X is the default
                param.display_type_rich = lambda ctx: None
                if not param.default:
                    param.secondary_opts = []
            elif param.param_type_name == "option":
                param._get_number_range_help_str = lambda: None  # a range is checked, and named when a value misses
                if param.metavar is None:
                    kind = param.type_descriptor.annotation
                    param.metavar = METAVARS.get(get_args(kind)[0] if get_args(kind) else kind, "VALUE")


def without_type(option: Any) -> Any:
    """`option` (--help) without `<bool>` in help."""
    if option is not None:
        option.display_type_rich = lambda ctx: None
    return option


def main() -> None:
    """Entry point: run the app; report errors as one line with a non-zero exit code."""
    _register()
    quiet_transformers()
    from .options import fill_optional_values

    if not sys.argv[1:]:
        sys.argv.append("--help")
    try:
        sys.argv[1:] = fill_optional_values(sys.argv[1:])
        command = typer.main.get_command(app)
        plain_metavars(command)
        code = command.main(prog_name="prumerge", standalone_mode=False)  # usage errors come back here, as one line
        if isinstance(code, int) and code:  # click returns a typer.Exit's code instead of exiting
            sys.exit(code)
    except Exit as exc:
        sys.exit(exc.exit_code)
    except Abort:
        err.print("[red]error:[/red] aborted")
        sys.exit(130)
    except TyperException as exc:  # usage errors: unknown or missing options, bad values
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        err.print(f"[red]error:[/red] {escape(exc.format_message())}{hint}")
        sys.exit(2)
    except PrumergeError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        sys.exit(2)
    except OSError as exc:  # the file system said no: a user's problem, not a bug
        where = f": {exc.filename}" if exc.filename else ""
        err.print(f"[red]error:[/red] {escape((exc.strerror or str(exc)) + where)}")
        sys.exit(2)
    except Exception as exc:
        if os.environ.get("PRUMERGE_DEBUG"):
            raise
        message = str(exc).splitlines()[0] if str(exc) else ""
        err.print(f"[red]error:[/red] {type(exc).__name__}: {escape(message)} (PRUMERGE_DEBUG=1 shows the traceback)")
        sys.exit(1)
