"""``gpual annotate``: label a round's queried superpixels in a browser page served from this machine."""
from __future__ import annotations

import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cli.options import RoundOpt, WorkspaceArg, console, workspace_path
from gpual.workspace import Workspace

if TYPE_CHECKING:
    from gpual.annotator.server import AnnotationSession

AnnotateDeviceOpt = typer.Option("auto", "--device", help="cpu, cuda or auto: where round N-1's model predicts the "
                                 "pre-chosen classes (auto: cuda when torch sees a GPU).")


def annotate(
    workspace: Path = WorkspaceArg,
    round: int = RoundOpt,
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="TCP port (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but 127.0.0.1, localhost or "
                             "::1 is reachable from other machines and needs the random token in the printed URL."),
    device: str = AnnotateDeviceOpt,
    open_browser: bool = typer.Option(True, "--open/--no-open", help="Open the page in this machine's browser."),
) -> None:
    """Serve round N's queried regions to a page where a person labels them.

    Each image with queried regions shows at full resolution, every superpixel outlined, the
    queried ones one at a time, with round N-1's predicted class pre-chosen (Enter confirms;
    1-9 and a-z pick a class, 0 = void, Shift+M paints a mixed region). Every answer is
    saved as it is given into the label store (rounds/N/answers.parquet and answers/*.png,
    source annotator, with the seconds spent); reopening the page continues at the first
    unanswered region. Reads the query, the superpixel cache, the pool images and
    rounds/N-1/checkpoint.pt; holds the workspace lock until the page's Done button (or
    Ctrl-C) stops the server.
    """
    ws = Workspace.open(workspace_path(workspace))
    with ws.lock("annotate"):
        session = serve(ws, round, host, port, device, open_browser)
    report(session)


def serve(ws: Workspace, round: int, host: str = "127.0.0.1", port: int = 8765, device: str = "auto",
          open_browser: bool = True) -> "AnnotationSession":
    """Serve round ``round``'s annotation page until Done or Ctrl-C (the caller holds the
    workspace lock); returns the session, whose answers are in the label store."""
    from gpual.annotator.server import AnnotationSession, AnnotatorServer

    session = AnnotationSession(ws, round, device)  # refuses an unselected or trained round
    server = AnnotatorServer(session, host, port)  # refuses a busy port, before serving anything
    progress = session.progress()
    console.print(
        f"round {round}: {progress['queried']} regions in {progress['images']} images, {progress['answered']} answered; "
        + ("pre-chosen classes from " + str(session.checkpoint) if session.checkpoint else "no model yet: nothing pre-chosen")
    )
    console.print(f"annotate at [bold]{server.url}[/]  (press Done on the page, or Ctrl-C here, to stop)", highlight=False)
    if server.token:
        console.print("the token in this URL is needed by every request: share it only with the annotator")
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C is a way to stop too: every answer given is already stored
        console.print("stopped by Ctrl-C")
    return session


def report(session: "AnnotationSession") -> None:
    """Where the round stands after the server stopped, and the command to run next."""
    progress = session.progress()
    ws, round = session.ws, session.round
    console.print(
        f"round {round}: {progress['answered']} / {progress['queried']} regions answered "
        f"({progress['images_done']} / {progress['images']} images done) in {ws.answers_path(round)}"
    )
    next_command = session.next_command(progress)
    if progress["answered"] == 0:
        console.print(f"no answers yet; next: {next_command}")
    elif progress["answered"] < progress["queried"]:
        console.print(f"next: {next_command}  (the unanswered regions return to the pool; or annotate again to finish)")
    else:
        console.print(f"next: {next_command}")


def register(app: typer.Typer) -> None:
    # cli.main._register_all may run more than once in one process (tests): register once.
    if not any(command.name == "annotate" for command in app.registered_commands):
        app.command("annotate")(annotate)
