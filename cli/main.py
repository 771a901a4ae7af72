"""``gpual``: the Typer application. Commands live in one module per pipeline stage
(``cli/<stage>.py``), each exposing ``register(app)``; this module builds the app, turns
:class:`~gpual.errors.GpualError`, an ``OSError`` met at the workspace boundary (read-only
or full disk, no permission) and Click's usage errors into one ``error: ...`` line on
stderr plus the exit code of :mod:`gpual.errors`' rule. The options commands share
live in :mod:`cli.options`.
"""
from __future__ import annotations

import sys

import typer
from rich.markup import escape

from cli import options
from cli.options import err_console
from gpual.errors import GpualError, os_error

app = typer.Typer(
    name="gpual",
    help="GPU-native active learning for semantic segmentation: pick the superpixels worth labelling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _error(message: str, exit_code: int) -> None:
    """Print ``error: MESSAGE`` (one line, as given: no rich markup) and exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


COMMAND_ORDER = ("init", "superpixels", "select", "annotate", "export", "import", "label", "train", "evaluate", "run",
                 "status", "presets", "demo")


def _register_all() -> None:
    from cli import workspace as workspace_cmds

    workspace_cmds.register(app)
    for name in ("superpixels", "train", "acquire", "annotate", "interchange"):
        try:
            module = __import__(f"cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as exc:  # a stage's commands not written yet
            if exc.name != f"cli.{name}":
                raise
            continue
        module.register(app)
    # `gpual --help` lists the commands in the order a round uses them.
    order = {name: i for i, name in enumerate(COMMAND_ORDER)}
    app.registered_commands.sort(key=lambda command: order.get(command.name or "", len(order)))


def main() -> None:
    """Console-script entry point: run the app, one-line errors, clean exit codes."""
    _register_all()
    options.current_workspace = None
    try:
        app(standalone_mode=False, prog_name="gpual")  # the usage lines say `gpual`, however it was started
    except GpualError as exc:
        _error(str(exc), exc.exit_code)
    except OSError as exc:  # the disk refused: read-only, full, no permission, a file where a folder should be
        error = os_error(exc, options.current_workspace)
        _error(str(error), error.exit_code)
    except typer.Abort:
        err_console.print("[bold red]error:[/] aborted; nothing was written by the interrupted step")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted; the previous state is intact, run the command again to continue")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors come through here in non-standalone mode
        if not isinstance(exc, _usage_error_types()):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # `gpual` alone (or a group without its command): the help
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        _error(_usage_message(exc), getattr(exc, "exit_code", 2))


def _usage_message(exc: Exception) -> str:
    """Click's usage error as gpual's one line: its message and where the help is
    (``Invalid value for '--round' / '-r': ...; see `gpual select --help```)."""
    format_message = getattr(exc, "format_message", None)
    message = " ".join(str(format_message() if callable(format_message) else exc).split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return message
    try:
        command = ctx.command_path
        help_option = ctx.help_option_names[0] if ctx.command.get_help_option(ctx) is not None else None
    except Exception:  # an older or newer Click without these: the message alone still helps
        return message
    return f"{message}; see `{command} {help_option}`" if help_option else message


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Click's exception base: vendored as ``typer._click`` since typer 0.26, plain
    ``click`` before (a RAPIDS container may ship either)."""
    types: list[type[BaseException]] = [typer.exceptions.TyperException] if hasattr(typer, "exceptions") else []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            continue
    return tuple(types)


if __name__ == "__main__":
    main()
