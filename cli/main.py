"""``gpual``: the Typer application. Commands live in one module per pipeline stage
(``cli/<stage>.py``), each exposing ``register(app)``; this module builds the app, turns
:class:`~gpual.errors.GpualError` into one line on stderr plus its exit code, and holds
the options every command shares.
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from gpual.errors import GpualError

console = Console(soft_wrap=True)  # commands and paths stay on one line, copy-pasteable
err_console = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="gpual",
    help="GPU-native active learning for semantic segmentation: pick the superpixels worth labelling.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Shared option definitions: one place for their help text.
WorkspaceArg = typer.Argument(..., help="Workspace folder (created by `gpual init`).", show_default=False)
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto (cuda when torch sees a GPU; selection also needs cuML/cuDF there).")
RoundOpt = typer.Option(..., "--round", "-r", help="Round number (0 = the random initial labels).", min=0)


def cell(value: float | None, form: str) -> str:
    """A table cell: ``value`` in ``form`` (e.g. ".4f", ".2%"), or "-" when it is absent."""
    return "-" if value is None else format(value, form)


def final_columns(rows: list[dict]) -> tuple[str, ...]:
    """The final-retraining column's header when any round row has a ``final_miou``, else none."""
    return ("mIoU, final retraining",) if any(row.get("final_miou") is not None for row in rows) else ()


def workspace_path(path: Path) -> Path:
    """Normalise a workspace argument (no existence check: commands decide)."""
    return Path(path).expanduser()


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


def main() -> None:
    """Console-script entry point: run the app, one-line errors, clean exit codes."""
    _register_all()
    try:
        app(standalone_mode=False)
    except GpualError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("[bold red]error:[/] aborted; nothing was written by the interrupted step")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[bold red]error:[/] interrupted; the previous state is intact, run the command again to continue")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors come through here in non-standalone mode
        show = getattr(exc, "show", None)
        if isinstance(exc, _usage_error_types()) and callable(show):
            show()
            sys.exit(getattr(exc, "exit_code", 2))
        raise


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
