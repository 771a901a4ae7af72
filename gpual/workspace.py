"""A gpual workspace: its config, superpixel cache and one folder per active-learning round.

Layout::

    WORKSPACE/
      gpual.toml                  config (every default of docs/method.md, see gpual.config)
      .lock                       held (flock) by the one command that writes
      superpixels/index.parquet   one row per pool image (see gpual.superpixels)
      superpixels/*.npz           one compressed uint16 label map per pool image
      superpixels/.partial/       new maps while `gpual superpixels` runs (moved in at its end)
      rounds/NNN/query.parquet    regions selected in round NNN (round 0: random init)
      rounds/NNN/answers.parquet  the label store: one row per answered region of round NNN,
      rounds/NNN/answers/*.png    whoever answered (see gpual.label_store)
      rounds/NNN/checkpoint.pt    student, teacher, memory bank after training round NNN
      rounds/NNN/metrics.json     evaluation, labelled share, per-stage times
      rounds/NNN/final/           the final retraining on round NNN's labels (optional:
                                  `gpual train --round N --final`): checkpoint.pt, metrics.json
      full/                       the full-supervision reference (`gpual train --full`)

A round moves through four steps: ``select`` -> ``label`` -> ``train`` -> ``evaluate``.
Select, train and evaluate are finished when their file exists (files are only ever
written atomically, so an existing file is a finished step); label is finished when
every queried region has an answer (or the round was trained on part of them,
``gpual train --partial``).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import socket
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from gpual import atomic
from gpual.config import Config, dump_config, load_config
from gpual.errors import GpualError, os_error

CONFIG_NAME = "gpual.toml"
STEPS = ("select", "label", "train", "evaluate")

# Column order and dtypes of the round tables (pandas names; cuDF accepts the same).
QUERY_COLUMNS = {
    "image": "string",
    "region": "int32",
    "round": "int32",
    "strategy": "string",
    "score": "float64",
    "pixels": "int64",
}
# One answered region (gpual.label_store); the cumulative labelled set of a round is the
# answers of rounds 0..N, so it has the same columns.
ANSWER_COLUMNS = {
    "image": "string",
    "region": "int32",
    "round": "int32",
    "kind": "string",  # "region": one class for the region; "pixels": the answer map holds its pixels
    "class": "int32",  # the region's class (kind "pixels": its most frequent labelled class); 255 = void
    "pixels": "int64",  # the region's size at the working scale (void included: the annotator sees them)
    "labeled_pixels": "int64",  # pixels with a class (not void, not left unpainted)
    "source": "string",  # gpual.label_store.SOURCES
    "written_at": "string",  # UTC, ISO 8601
    "seconds": "float64",  # time the annotator spent on the region (NaN when not measured)
}
LABELED_COLUMNS = ANSWER_COLUMNS
LEGACY_LABELED = "labeled.parquet"  # gpual 0.1's label file, before the label store


@dataclass(frozen=True)
class ModelRun:
    """Where one trained model of a workspace lives, and how the CLI names it.

    Three kinds: a round's model (fine-tuned from the round before), the final retraining
    on a round's labels (fresh weights, ``train.final_epochs``: the paper's final stage and
    the same schedule as the reference), and the full-supervision reference.
    """

    round: int | None  # None: the full reference
    final: bool
    folder: Path
    label: str  # "round 3", "round 3 (final retraining)", "the full reference"
    flags: str  # the CLI's way to name it: "--round 3", "--round 3 --final", "--full"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def state(self) -> Path:
        """Per-epoch training state while it trains (removed when it finishes)."""
        return self.folder / "train_state.pt"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.json"


@dataclass(frozen=True)
class RoundState:
    """Which steps of one round are finished."""

    round: int
    selected: bool
    labeled: bool  # every queried region answered, or trained on part of them (--partial)
    trained: bool
    evaluated: bool
    answered: int = 0  # queried regions with an answer
    queried: int = 0

    @property
    def next_step(self) -> str | None:
        for step, done in zip(STEPS, (self.selected, self.labeled, self.trained, self.evaluated)):
            if not done:
                return step
        return None


class Workspace:
    """One workspace folder; cheap to open, reads files lazily."""

    def __init__(self, root: Path, config: Config) -> None:
        self.root = Path(root)
        self.config = config

    # --- creation and opening ---------------------------------------------------------
    @classmethod
    def create(cls, root: Path, config: Config, force: bool = False) -> "Workspace":
        """Write ``root/gpual.toml``; refuse to overwrite an existing config unless ``force``."""
        root = Path(root)
        path = root / CONFIG_NAME
        if path.exists() and not force:
            raise GpualError(f"{path} already exists: open it as it is, or pass --force to overwrite its config")
        if root.exists() and not root.is_dir():
            raise GpualError(f"{root} exists and is not a folder: choose another workspace path")
        root.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, dump_config(config))
        return cls(root, config)

    @classmethod
    def open(cls, root: Path) -> "Workspace":
        """Open an existing workspace (its config is read and validated).

        Every problem with the config (not TOML, an unknown key, a wrong type, a value out
        of range) is a GpualError with exit code 2 that names the file and the fix.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise GpualError(
                f"{root} is a file, not a gpual workspace folder: give the workspace's folder "
                f"(a new one is made with `gpual init NEW --data PATH`)"
            )
        if not root.exists():
            raise GpualError(f"{root} is not a gpual workspace (it does not exist): create it with `gpual init {root} --data PATH`")
        if not (root / CONFIG_NAME).exists():
            raise GpualError(f"{root} is not a gpual workspace (no {CONFIG_NAME}): create it with `gpual init {root} --data PATH`")
        return cls(root, _load_workspace_config(root / CONFIG_NAME))

    def save_config(self) -> None:
        atomic.write_text(self.root / CONFIG_NAME, dump_config(self.config))

    # --- the writer lock ----------------------------------------------------------------
    @contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the workspace's writer lock for the duration of ``command``.

        An advisory ``flock``: the OS drops it when the process dies, so a crash never
        leaves a stale lock. A second writer gets a one-line error naming the holder; a
        workspace that cannot be written (read-only disk, no permission) a one-line error
        saying what to do. Once held, the temporaries that killed writers left behind are
        deleted (:meth:`sweep_temporaries`).
        """
        path = self.root / ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only disk, no permission, .lock a folder
            raise os_error(exc, self.root) from None
        try:
            try:
                _take_lock(fd)
            except BlockingIOError:
                holder = path.read_text().strip() or "another process"
                raise GpualError(
                    f"workspace {self.root} is locked by {holder}: wait for it to finish, then run `gpual {command}` again"
                ) from None
            except OSError as exc:  # a file system without locks (ENOLCK)
                raise os_error(exc, self.root) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"`gpual {command}` (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})".encode())
            self.sweep_temporaries()
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> str | None:
        """The command holding the writer lock now (its ``gpual ...`` line, pid, host and
        start), or None when no process holds it. Reads only: a shared, non-blocking probe."""
        path = self.root / ".lock"
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # no lock file yet, or unreadable: nobody has written here
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return path.read_text().strip() or "another process"
        except OSError:
            return None
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def sweep_temporaries(self) -> list[Path]:
        """Delete the temporary files (and :func:`gpual.atomic.atomic_dir` folders) that a
        killed writer left: only names of :data:`gpual.atomic.TEMP_NAME`, in the workspace
        folder, ``superpixels/`` (and its staging folder), ``rounds/``, every round's folder
        and the folders in it, and ``full/``. Call it holding the lock (:meth:`lock` does)."""
        folders = [self.root, self.superpixel_dir, self.superpixel_staging_dir, self.rounds_dir]
        for top in [*_subfolders(self.rounds_dir), self.full_dir]:
            folders.append(top)
            folders.extend(_subfolders(top))
        removed: list[Path] = []
        for folder in folders:
            removed.extend(atomic.sweep(folder))
        # A kill between writing a checkpoint and deleting its resume state leaves the
        # state (hundreds of MB) beside a finished model: nothing would ever read it.
        runs = [self.model_run(None)] + [self.model_run(r, final) for r in (self.rounds() if self.rounds_dir.is_dir() else [])
                                        for final in (False, True)]
        for run in runs:
            if run.checkpoint.exists() and run.state.exists():
                run.state.unlink()
                removed.append(run.state)
        return removed

    # --- paths ------------------------------------------------------------------------
    @property
    def superpixel_dir(self) -> Path:
        return self.root / "superpixels"

    @property
    def superpixel_staging_dir(self) -> Path:
        """Where ``gpual superpixels`` writes new maps until every one is computed (then
        they move into :attr:`superpixel_dir`); left only by a killed or interrupted run,
        whose maps the next run reuses."""
        return self.superpixel_dir / ".partial"

    @property
    def rounds_dir(self) -> Path:
        return self.root / "rounds"

    def round_dir(self, round: int) -> Path:
        if round < 0:
            raise GpualError(f"round {round} is negative: rounds count from 0")
        return self.rounds_dir / f"{round:03d}"

    def query_path(self, round: int) -> Path:
        return self.round_dir(round) / "query.parquet"

    def answers_path(self, round: int) -> Path:
        """The label store's table of round ``round`` (see :mod:`gpual.label_store`)."""
        return self.round_dir(round) / "answers.parquet"

    def answers_dir(self, round: int) -> Path:
        """The label store's per-image answer maps of round ``round``."""
        return self.round_dir(round) / "answers"

    def checkpoint_path(self, round: int) -> Path:
        return self.model_run(round).checkpoint

    def resume_path(self, round: int) -> Path:
        """Per-epoch training state of a round in progress (removed when it finishes)."""
        return self.model_run(round).state

    def metrics_path(self, round: int) -> Path:
        return self.model_run(round).metrics

    def overlay_dir(self, round: int) -> Path:
        return self.round_dir(round) / "overlays"

    @property
    def full_dir(self) -> Path:
        """The full-supervision reference run (``gpual train --full``)."""
        return self.root / "full"

    def final_dir(self, round: int) -> Path:
        """The final retraining on round ``round``'s labels (``gpual train --round N --final``)."""
        return self.round_dir(round) / "final"

    def model_run(self, round: int | None, final: bool = False) -> ModelRun:
        """Round ``round``'s model, its final retraining (``final``), or the full reference (``round=None``)."""
        if round is None:
            if final:
                raise GpualError("--final retrains a round's labels: give --round N, not --full", 2)
            return ModelRun(None, False, self.full_dir, "the full reference", "--full")
        if final:
            return ModelRun(round, True, self.final_dir(round), f"round {round} (final retraining)", f"--round {round} --final")
        return ModelRun(round, False, self.round_dir(round), f"round {round}", f"--round {round}")

    # --- round state --------------------------------------------------------------------
    def rounds(self) -> list[int]:
        """Round numbers that have a folder, ascending."""
        if not self.rounds_dir.exists():
            return []
        return sorted(int(p.name) for p in self.rounds_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def round_state(self, round: int) -> RoundState:
        selected = self.query_path(round).exists()
        queried = len(self.read_query(round)) if selected else 0
        answered = len(self.read_answers(round)) if selected else 0
        trained = self.checkpoint_path(round).exists()
        return RoundState(
            round=round,
            selected=selected,
            labeled=selected and ((queried > 0 and answered >= queried) or trained),
            trained=trained,
            evaluated=self.metrics_path(round).exists() and "evaluation" in self.read_metrics(round),
            answered=answered,
            queried=queried,
        )

    def next_step(self) -> tuple[int, str]:
        """The first unfinished (round, step); a finished last round points at the next select."""
        rounds = self.rounds()
        for r in rounds:
            step = self.round_state(r).next_step
            if step is not None:
                return r, step
        return (rounds[-1] + 1 if rounds else 0), "select"

    def require(self, round: int, step: str, command: str, partial: bool = False) -> None:
        """Refuse ``command`` unless every step before ``step`` of ``round`` (and the rounds
        before it) is finished; the error says which command to run first. ``partial``
        accepts a round with some of its regions answered as labelled."""
        if step not in STEPS:
            raise ValueError(step)
        if round > 0:
            prev = self.round_state(round - 1)
            if not prev.trained:
                raise GpualError(
                    f"round {round - 1} is not trained: run `gpual train {self.root} --round {round - 1}` before `gpual {command} --round {round}`"
                )
        state = self.round_state(round)
        done = dict(zip(STEPS, (state.selected, state.labeled or (partial and state.answered > 0), state.trained,
                                state.evaluated)))
        for before in STEPS[: STEPS.index(step)]:
            if before == "label" and not done[before] and state.answered:
                raise GpualError(
                    f"round {round} has {state.answered:,} / {state.queried:,} regions answered: finish labelling "
                    f"(`gpual annotate {self.root} --round {round}` or `gpual import`), or pass --partial to "
                    f"`gpual {command}` to use the answers there are"
                )
            if not done[before]:
                raise GpualError(
                    f"round {round} has no {before} step yet: run `gpual {before} {self.root} --round {round}` before `gpual {command}`"
                )

    # --- tables -------------------------------------------------------------------------
    def write_query(self, round: int, frame: Any) -> None:
        """Write round ``round``'s selection (columns of ``QUERY_COLUMNS``) atomically."""
        _check_columns(frame, QUERY_COLUMNS, "query")
        atomic.write_parquet(self.query_path(round), frame)

    def read_query(self, round: int) -> pd.DataFrame:
        return _read_table(self.query_path(round), f"round {round} has no selection: run `gpual select {self.root} --round {round}`")

    def write_answers(self, round: int, frame: Any) -> None:
        """Write round ``round``'s answer table (columns of ``ANSWER_COLUMNS``) atomically;
        :func:`gpual.label_store.record_answers` is the writer that validates."""
        _check_columns(frame, ANSWER_COLUMNS, "answers")
        atomic.write_parquet(self.answers_path(round), frame)

    def read_answers(self, round: int) -> pd.DataFrame:
        """Round ``round``'s answered regions (an empty table before any answer)."""
        path = self.answers_path(round)
        if not path.exists():
            if (self.round_dir(round) / LEGACY_LABELED).exists():
                raise GpualError(
                    f"round {round} of {self.root} was labelled by gpual 0.1 ({LEGACY_LABELED}, before the label store): "
                    f"start a new workspace (`gpual init NEW --data {self.config.data.root}`)"
                )
            return empty_table(ANSWER_COLUMNS)
        return _read_table(path, "").astype(ANSWER_COLUMNS)

    def read_labeled(self, round: int) -> pd.DataFrame:
        """The cumulative labelled set after round ``round``: the answers of rounds 0..round
        (an empty table before round 0)."""
        tables = [self.read_answers(r) for r in self.rounds() if r <= round]
        tables = [t for t in tables if len(t)]
        if not tables:
            return empty_table(ANSWER_COLUMNS)
        return pd.concat(tables, ignore_index=True).astype(ANSWER_COLUMNS)

    def labeling(self, round: int, pool_pixels: int | None = None) -> dict[str, Any]:
        """The labelling summary after round ``round``: cumulative regions, pixels (every
        pixel of an answered region) and their share of the pool, this round's answered /
        queried regions, and the answer sources."""
        if pool_pixels is None:
            from gpual.superpixels import read_index  # the superpixel stage owns its index

            pool_pixels = int(read_index(self)["pixels"].sum())
        table = self.read_labeled(round)
        mine = table[table["round"] == round]
        pixels = int(table["pixels"].sum())
        return {
            "regions": int(len(table)),
            "pixels": pixels,
            "labeled_share": pixels / pool_pixels if pool_pixels else 0.0,
            "labeled_pixels": int(table["labeled_pixels"].sum()),
            "answered": int(len(mine)),
            "queried": int(len(self.read_query(round))) if self.query_path(round).exists() else 0,
            "new_pixels": int(mine["pixels"].sum()),
            "images": int(table["image"].nunique()),
            "void_regions": int((table["class"] == 255).sum()),
            "sources": {str(k): int(v) for k, v in mine["source"].value_counts().items()},
        }

    def read_metrics(self, round: int) -> dict[str, Any]:
        """Round ``round``'s metrics JSON ({} before the round has any)."""
        return _read_metrics(self.metrics_path(round))

    def update_metrics(self, round: int, **sections: Any) -> dict[str, Any]:
        """Merge ``sections`` into round ``round``'s metrics JSON (atomic rewrite)."""
        return _merge_metrics(self.metrics_path(round), sections)

    def read_full_metrics(self) -> dict[str, Any]:
        """``full/metrics.json`` of the full-supervision reference ({} before it exists)."""
        return self.read_run_metrics(self.model_run(None))

    def read_run_metrics(self, run: ModelRun) -> dict[str, Any]:
        """The metrics JSON of any :class:`ModelRun` ({} before it has any)."""
        return _read_metrics(run.metrics)

    def update_run_metrics(self, run: ModelRun, drop: tuple[str, ...] = (), **sections: Any) -> dict[str, Any]:
        """Merge ``sections`` into a :class:`ModelRun`'s metrics JSON, without the sections
        named in ``drop`` (one atomic rewrite)."""
        return _merge_metrics(run.metrics, sections, drop)

    # --- status -------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Rounds (labeled regions and pixel share, mIoU, and ``final_miou`` where a round's
        final retraining is evaluated), the full reference's mIoU (``full_miou``, None before
        it is evaluated), and the next command to run."""
        from gpual.superpixels import read_index  # the superpixel stage owns its index

        index = read_index(self) if (self.superpixel_dir / "index.parquet").exists() else None
        pool_pixels = int(index["pixels"].sum()) if index is not None else 0
        pool_regions = int(index["n_regions"].sum()) if index is not None else 0
        rounds = []
        for r in self.rounds():
            state = self.round_state(r)
            entry: dict[str, Any] = {"round": r, "next_step": state.next_step}
            for step, done in zip(STEPS, (state.selected, state.labeled, state.trained, state.evaluated)):
                entry[step] = done
            entry["answered"], entry["queried"] = state.answered, state.queried
            if state.answered:
                labeling = self.labeling(r, pool_pixels)
                entry["labeled_regions"] = labeling["regions"]
                entry["labeled_pixels"] = labeling["pixels"]
                entry["labeled_share"] = labeling["labeled_share"] if pool_pixels else None
            evaluation = self.read_metrics(r).get("evaluation")
            if evaluation:
                entry["miou"] = evaluation.get("miou")
            final = self.read_run_metrics(self.model_run(r, final=True)).get("evaluation")
            if final:
                entry["final_miou"] = final.get("miou")
            rounds.append(entry)
        if index is None:
            next_command = f"gpual superpixels {self.root}"
        else:
            r, step = self.next_step()
            next_command = f"gpual {step} {self.root} --round {r}"
            if step == "label" and not self._pool_has_labels():
                next_command = f"gpual annotate {self.root} --round {r}"  # a person labels an unlabelled pool
        running = self.holder()
        if running is not None:  # its next step is being done now: say so instead of advising it
            next_command = f"wait: {running} is working on this workspace"
        return {
            "workspace": str(self.root),
            "running": running,
            "dataset": self.config.data.dataset,
            "data": self.config.data.root,
            "pool_images": int(len(index)) if index is not None else 0,
            "pool_regions": pool_regions,
            "pool_pixels": pool_pixels,
            "rounds": rounds,
            "full_miou": self.read_full_metrics().get("evaluation", {}).get("miou"),
            "next": next_command,
        }


    def _pool_has_labels(self) -> bool:
        """Whether the pool split has ground truth (the simulated oracle's precondition)."""
        from gpual.datasets import open_dataset

        try:
            return open_dataset(self.config.data.dataset, self.config.data.root).has_labels(self.config.data.pool_split)
        except GpualError:
            return False


def _take_lock(fd: int, tries: int = 10, pause_s: float = 0.01) -> None:
    """The exclusive, non-blocking flock on ``fd``, tried ``tries`` times ``pause_s`` apart:
    a ``gpual status`` probing the lock (a shared flock held for an instant) must not make
    a starting command fail. BlockingIOError when another writer really holds it."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(pause_s)


def _subfolders(folder: Path) -> list[Path]:
    """The folders directly in ``folder`` (none when it does not exist), hidden ones aside."""
    try:
        return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
    except OSError:
        return []


def _load_workspace_config(path: Path) -> Config:
    """:func:`gpual.config.load_config`, every error naming ``path`` and the fix, exit code 2."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise os_error(exc) from None
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        where = f"line {line[1]} of {path}" if line else str(path)
        raise GpualError(f"{path} is not valid TOML ({exc}): fix {where} in an editor (the other settings are kept)", 2) from None
    try:
        return load_config(path)
    except GpualError as exc:
        message = str(exc)
        if message.endswith("fix it in gpual.toml"):
            message = f"{message[: -len('gpual.toml')]}{path}"
        elif str(path) not in message:
            message = f"{message}; fix it in {path}"
        raise GpualError(message, 2) from None


def empty_table(columns: dict[str, str]) -> pd.DataFrame:
    """An empty pandas table with ``columns``' names and dtypes."""
    return pd.DataFrame({name: pd.Series([], dtype=dtype) for name, dtype in columns.items()})


def _check_columns(frame: Any, columns: dict[str, str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} table lacks column(s) {missing}")


def _read_table(path: Path, missing_message: str) -> pd.DataFrame:
    if not path.exists():
        raise GpualError(missing_message)
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise GpualError(f"{path} is unreadable ({type(exc).__name__}): delete it and run the step that writes it again") from None


def _read_metrics(path: Path) -> dict[str, Any]:
    """A metrics JSON file as a dict; {} when it does not exist yet."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise GpualError(f"{path} is corrupt: delete it and run the step that wrote it again") from None


def _merge_metrics(path: Path, sections: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """Merge top-level ``sections`` into the metrics JSON at ``path``, less the sections in
    ``drop`` (atomic rewrite)."""
    metrics = {**{k: v for k, v in _read_metrics(path).items() if k not in drop}, **sections}
    atomic.write_json(path, metrics)
    return metrics
