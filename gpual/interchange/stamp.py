"""Which workspace and round an export belongs to, so an import can refuse any other's.

A :class:`Stamp` names the workspace (its resolved path, and a short hash of it), the round,
and a hash of the round's query (its image/region pairs): a round selected again
(``gpual select --force``) changes the hash, so an export of the old selection is refused
too. Every export writes ``gpual-export.json`` (the stamp, the classes, the working scale
and the images' stored sizes); each format also carries the stamp where the tool keeps it
(Label Studio: in every task's data; CVAT: as the task name).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gpual import atomic
from gpual.errors import GpualError
from gpual.workspace import Workspace

MANIFEST = "gpual-export.json"
MANIFEST_VERSION = 1
_TOKEN = re.compile(r"gpual-(?P<workspace_id>[0-9a-f]{8})-r(?P<round>\d+)-(?P<query>[0-9a-f]{16})")


@dataclass(frozen=True)
class Stamp:
    workspace: str  # resolved workspace path ("" when only the token was kept)
    workspace_id: str  # first 8 hex digits of the path's SHA-256
    round: int
    query: str  # first 16 hex digits of the SHA-256 of the query's sorted "image<TAB>region" lines

    @property
    def token(self) -> str:
        """The stamp in one word, for tools that keep a name and nothing else (CVAT's task name)."""
        return f"gpual-{self.workspace_id}-r{self.round}-{self.query}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_stamp(ws: Workspace, round: int, query: pd.DataFrame) -> Stamp:
    """The stamp of round ``round`` of ``ws`` with its current query."""
    path = str(Path(ws.root).resolve())
    lines = sorted(f"{image}\t{int(region)}" for image, region in zip(query["image"].astype(str), query["region"]))
    return Stamp(
        workspace=path,
        workspace_id=hashlib.sha256(path.encode()).hexdigest()[:8],
        round=int(round),
        query=hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16],
    )


def stamp_from_dict(data: Any, where: str) -> Stamp:
    """A stamp read back from a file; a missing or malformed one is a one-line error."""
    try:
        return Stamp(str(data["workspace"]), str(data["workspace_id"]), int(data["round"]), str(data["query"]))
    except (KeyError, TypeError, ValueError):
        raise GpualError(f"{where} carries no valid gpual stamp: import only what `gpual export` wrote (and the tool exported back)") from None


def stamp_from_token(text: str | None) -> Stamp | None:
    """The stamp in a name like ``gpual-1a2b3c4d-r3-0123456789abcdef``; None where there is none."""
    match = _TOKEN.search(text or "")
    if match is None:
        return None
    return Stamp("", match["workspace_id"], int(match["round"]), match["query"])


def check_stamp(found: Stamp, expected: Stamp, where: str, ws_root: Path) -> None:
    """Refuse a file from another round, another workspace or an older selection of the round."""
    if found.round != expected.round:
        raise GpualError(
            f"{where} is an export of round {found.round}, not round {expected.round}: import it with --round {found.round}"
        )
    if found.workspace_id != expected.workspace_id:
        other = f" ({found.workspace})" if found.workspace else ""
        raise GpualError(
            f"{where} was exported from another workspace{other}, not {ws_root}: import it into the workspace that exported it"
        )
    if found.query != expected.query:
        raise GpualError(
            f"{where} was exported from an earlier selection of round {expected.round} (its query changed since): "
            f"export round {expected.round} again with `gpual export {ws_root} --round {expected.round}` and label that"
        )


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic.write_json(folder / MANIFEST, {"gpual_export": MANIFEST_VERSION, **manifest})


def read_manifest(path: Path) -> dict[str, Any]:
    """``gpual-export.json`` at ``path`` (a file, or a folder holding it) as a dict."""
    path = path / MANIFEST if path.is_dir() else path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GpualError(f"{path} is missing: give the folder `gpual export` wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GpualError(f"{path} is corrupt ({type(exc).__name__}): export the round again") from None
    if not isinstance(data, dict) or "gpual_export" not in data:
        raise GpualError(f"{path} is not a gpual export index: give the folder `gpual export` wrote")
    return data
