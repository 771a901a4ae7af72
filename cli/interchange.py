"""``gpual export`` and ``gpual import``: a round's queried regions out to an annotation tool
(Label Studio, CVAT, plain masks), the tool's answers back into the label store."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.options import RoundOpt, WorkspaceArg, console, workspace_path
from gpual.workspace import Workspace

FORMAT_HELP = "label-studio, cvat or masks."


def export(
    workspace: Path = WorkspaceArg,
    round: int = RoundOpt,
    fmt: str = typer.Option(..., "--format", "-f", help=FORMAT_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (new, or an earlier export with --force).", show_default=False),
    document_root: Path = typer.Option(
        None, "--document-root", show_default=False,
        help="label-studio: Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, which the task image URLs are relative "
        "to (default: that variable where set, else the dataset root).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an earlier export in OUT (and whatever was labelled in it)."),
) -> None:
    """Write round N's queried regions for an annotation tool, at the images' stored size.

    Reads rounds/N/query.parquet, the superpixel cache and the pool images; writes the
    folder OUT whole (or nothing): label-studio: tasks.json (a brush pre-annotation per
    region, labelled 'to label') and labeling-config.xml; cvat: annotations.xml (CVAT for
    images 1.1, a polygon per region), labels.json and images/; masks: images/, regions/
    (uint16, region id + 1) and an empty labels/. Each export also gets gpual-export.json,
    naming the workspace, round and query it belongs to: `gpual import` refuses it
    anywhere else. See docs/annotation-tools.md.
    """
    from gpual.interchange import export_round

    ws = Workspace.open(workspace_path(workspace))
    # Locked as import is: a `gpual select --force` (or an import) meanwhile would give an
    # export of a query that is no longer the round's, refused later by its stamp.
    with ws.lock("export"):
        summary = export_round(ws, round, fmt, Path(out).expanduser(), document_root, force)
    console.print(f"round {round}: {summary.regions} queried regions of {summary.images} images exported as {fmt} to {summary.out}")
    info, back = summary.info, f"gpual import {ws.root} --round {round}"
    if fmt == "label-studio":
        console.print(
            f"Label Studio: start it with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true "
            f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={info['document_root']}; create a project with "
            f"{summary.out / info['labeling_config']}, add a Local files source storage with the absolute path "
            f"{info['storage_path']} (no sync needed) and import {summary.out / info['tasks']}"
        )
        console.print(f"after labelling: Export -> JSON, then {back} EXPORT.json")
    elif fmt == "cvat":
        console.print(
            f"CVAT: create a task named {info['task_name']} with the labels of {summary.out / info['labels']} (Raw) and the "
            f"images in {summary.out / info['images']}, then upload {summary.out / info['annotations']} as 'CVAT 1.1' annotations"
        )
        console.print(f"after labelling: export the task as 'CVAT for images 1.1', then {back} EXPORT.zip")
    else:
        console.print(f"write labels/<image>.png (class indices, 255 = not labelled) into {summary.out}, then {back} {summary.out}")


def import_(
    workspace: Path = WorkspaceArg,
    round: int = RoundOpt,
    path: Path = typer.Argument(..., help="The tool's export: a Label Studio JSON, a CVAT XML / zip, or a masks export folder.",
                                show_default=False),
    fmt: str = typer.Option(None, "--format", "-f", help=f"{FORMAT_HELP} (default: told from PATH).", show_default=False),
    empty_is_void: bool = typer.Option(
        False, "--empty-is-void",
        help="In an image with labels, answer a queried region left unlabelled as void (for tools whose 255 means void) "
        "instead of leaving it unanswered.",
    ),
) -> None:
    """Read an annotation tool's export of round N back into the label store.

    Checks everything before writing anything: the file's workspace, round and query (its
    stamp), every image, label name and mask size (the stored image size, scaled to the
    working scale with nearest neighbour, or the working size itself). Then writes the
    answers into rounds/N/answers.parquet and answers/*.png (source label-studio, cvat or
    masks); labels outside the queried regions are passed over and counted, regions left
    unlabelled stay unanswered and are counted (`gpual status` shows answered / queried).
    """
    from gpual.interchange import import_round

    ws = Workspace.open(workspace_path(workspace))
    with ws.lock("import"):
        s = import_round(ws, round, Path(path).expanduser(), fmt, empty_is_void)
    kinds = ", ".join(f"{s.kinds.get(k, 0)} {label}" for k, label in
                      (("region", "one class"), ("pixels", "several classes"), ("void", "void")))
    console.print(
        f"round {round}: {s.regions} answers imported from {s.path} ({s.format}, {s.images} images: {kinds}"
        + (f"; {s.replaced} replaced earlier answers" if s.replaced else "") + ")"
    )
    console.print(
        f"{s.empty} queried regions left empty (unanswered), {s.outside} labelled pixels outside the queried regions passed over"
        + (f", {s.ignored} shapes of other kinds passed over" if s.ignored else "")
    )
    if s.answered >= s.queried:
        console.print(f"round {round}: {s.answered} / {s.queried} regions answered; next: gpual train {ws.root} --round {round}")
    else:
        console.print(
            f"round {round}: {s.answered} / {s.queried} regions answered; label the rest and import again, or "
            f"gpual train {ws.root} --round {round} --partial"
        )


def register(app: typer.Typer) -> None:
    # cli.main._register_all may run more than once in one process (tests): register once.
    names = {command.name for command in app.registered_commands}
    for name, function in (("export", export), ("import", import_)):
        if name not in names:
            app.command(name)(function)
