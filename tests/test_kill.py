"""kill -9 at seeded random moments: `gpual superpixels`, `select`, `label`, `train` and `run`
are started as processes on tiny synthetic scenes and killed with SIGKILL part-way through
their work. After every kill:

- `gpual status WS` works (exit 0) and reports nobody running: the OS dropped the dead
  process's flock, whatever its .lock file still says;
- re-running the interrupted command (following its one-line advice where it gives one,
  e.g. `--resume` for a training that left its per-epoch state) and finishing the round
  gives the files of an uninterrupted run with the same seed: the superpixel maps and
  index, query.parquet, answers.parquet (less its clock columns) and answer maps, the
  overlays, the checkpoint's tensors (torch.equal) and the evaluation's mIoU;
- no temporary of gpual.atomic (TEMP_NAME), no swap leftover (.NAME.old) and no
  train_state.pt is left.

The reference is the same steps run uninterrupted: as processes, timed, for the kinds that
are killed, the others in this process. `gpual run` (from a fresh workspace, and resuming at
round 1) must give the same files; its uninterrupted duration is that of the steps it runs.
A kill's delay is a seeded fraction of the command's timed duration, counted from when the
killed process holds the workspace lock (read from .lock's text: probing the flock itself
could make the starting command see a second writer). That scales the delays to the
machine; nothing here asserts a duration.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cli_runner import cli_quiet, run_cli

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
GPUAL = [sys.executable, "-c", "import sys; sys.argv[0] = 'gpual'; from cli.main import main; main()"]
ROUNDS = 2
CLOCK_COLUMNS = ["written_at", "seconds"]  # when an answer was written and how long it took: not state
SEED = 20_240_917
# The smallest loop that runs every step: 4 pool images of 32x48 (24 regions each), two
# rounds, two epochs per round (so a kill can land between the per-epoch state and the
# checkpoint), the entropy strategy in round 1 (the teacher's forward, without UMAP's
# compilation), one overlay per round.
SETTINGS = ("acquisition.init_budget=24", "acquisition.budget=8", "acquisition.overlays=1",
            "acquisition.strategy=entropy", "train.epochs_per_round=2")
DEVICE = ("--device", "cpu")


@dataclass(frozen=True)
class Step:
    name: str  # "superpixels", "select 0", ...: the snapshot before it is named the same
    args: tuple[str, ...]  # after the workspace argument
    round: int  # the round it belongs to (superpixels: 0)


STEPS = [Step("superpixels", ("superpixels", "--workers", "1"), 0)]
for _r in range(ROUNDS):
    STEPS += [
        Step(f"select {_r}", ("select", "--round", str(_r), *DEVICE), _r),
        Step(f"label {_r}", ("label", "--round", str(_r)), _r),
        Step(f"train {_r}", ("train", "--round", str(_r), *DEVICE), _r),
        Step(f"evaluate {_r}", ("evaluate", "--round", str(_r), *DEVICE), _r),
    ]
# `gpual run` from a fresh workspace, and resuming one whose round 0 is done; its steps are
# those of STEPS from the snapshot it starts at.
RUNS = {"run": "superpixels", "run from round 1": "select 1"}
RUN_STEPS = {name: Step(name, ("run", "--rounds", str(ROUNDS), *DEVICE), ROUNDS - 1) for name in RUNS}
BY_NAME = {step.name: step for step in [*STEPS, *RUN_STEPS.values()]}

# The kill trials: which command, killed at which seeded fraction of its timed duration.
TRIALS = ["superpixels", "superpixels", "select 0", "select 1", "label 0", "train 0", "train 0", "train 1",
          "run", "run from round 1"]
FRACTIONS = np.random.default_rng(SEED).uniform(0.05, 0.95, len(TRIALS))


@dataclass
class World:
    ws: Path  # the one path every trial's workspace lives at (gpual.toml's paths stay valid)
    snapshots: dict[str, Path]  # the workspace before each step ("run": before `gpual run`)
    reference: Path  # the workspace after every step, uninterrupted
    seconds: dict[str, float]  # each step's duration, uninterrupted, in this process

    def restore(self, name: str) -> None:
        if self.ws.exists():
            shutil.rmtree(self.ws)
        shutil.copytree(self.snapshots[name], self.ws)


def cli(capsys: pytest.CaptureFixture[str], ws: Path, *args: str):
    return run_cli(capsys, args[0], ws, *args[1:])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from gpual.synthetic import make_scenes

    top = tmp_path_factory.mktemp("kill")
    data = make_scenes(top / "data", n_train=4, n_val=1, height=32, width=48).root
    ws = top / "ws"
    settings = [item for setting in SETTINGS for item in ("--set", setting)]
    cli_quiet("init", ws, "--data", data, "--dataset", "folder", "--preset", "demo", *settings)
    (ws / ".lock").touch()  # as every locking command leaves it
    world = World(ws, {}, top / "reference", {})
    for step in STEPS:
        world.snapshots[step.name] = top / f"before-{step.name.replace(' ', '-')}"
        shutil.copytree(ws, world.snapshots[step.name])
        if step.name in TRIALS:  # a kind that is killed: timed as the trials run it
            world.seconds[step.name] = run_timed(world, step)
        else:
            start = time.perf_counter()
            cli_quiet(step.args[0], ws, *step.args[1:])
            world.seconds[step.name] = time.perf_counter() - start
    shutil.copytree(ws, world.reference)
    # `gpual run` does these steps in one process: its uninterrupted duration is theirs (and
    # its files are theirs: every run trial compares them).
    for name, first in RUNS.items():
        world.snapshots[name] = world.snapshots[first]
        world.seconds[name] = sum(world.seconds[s.name] for s in STEPS[[s.name for s in STEPS].index(first):])
    return world


# --- comparing a workspace with the reference ---------------------------------------------


def assert_same_state(ws: Path, reference: Path, last_round: int) -> None:
    """``ws`` holds the reference's files for the superpixels and rounds 0..``last_round``:
    the same file names, and the same contents where they are deterministic on CPU."""
    names = _names(ws, last_round)
    assert names == _names(reference, last_round)
    _same_superpixels(ws, reference, names)
    for r in range(last_round + 1):
        folder = f"rounds/{r:03d}"
        pd.testing.assert_frame_equal(pd.read_parquet(ws / folder / "query.parquet"),
                                      pd.read_parquet(reference / folder / "query.parquet"))
        pd.testing.assert_frame_equal(pd.read_parquet(ws / folder / "answers.parquet").drop(columns=CLOCK_COLUMNS),
                                      pd.read_parquet(reference / folder / "answers.parquet").drop(columns=CLOCK_COLUMNS))
        for name in names:
            if name.startswith((f"{folder}/answers/", f"{folder}/overlays/")) and name.endswith(".png"):
                assert (ws / name).read_bytes() == (reference / name).read_bytes(), name
        _same_checkpoint(ws / folder / "checkpoint.pt", reference / folder / "checkpoint.pt")
        miou = [json.loads((root / folder / "metrics.json").read_text())["evaluation"]["miou"] for root in (ws, reference)]
        assert miou[0] == miou[1], (folder, miou)


def _names(root: Path, last_round: int) -> set[str]:
    """Every file and folder of the workspace up to round ``last_round`` (.lock aside: its
    text names the last process that held it)."""
    later = tuple(f"rounds/{r:03d}" for r in range(last_round + 1, ROUNDS + 1))
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.name != ".lock" and not str(p.relative_to(root)).startswith(later)}


def _same_superpixels(ws: Path, reference: Path, names: set[str]) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(ws / "superpixels" / "index.parquet"),
                                  pd.read_parquet(reference / "superpixels" / "index.parquet"))
    maps = sorted(n for n in names if n.startswith("superpixels/") and n.endswith(".npz"))
    assert maps
    for name in maps:  # the arrays: a zip member's timestamp differs from run to run
        with np.load(ws / name) as got, np.load(reference / name) as want:
            np.testing.assert_array_equal(got["labels"], want["labels"], err_msg=name)


def _same_checkpoint(path: Path, reference: Path) -> None:
    got, want = (torch.load(p, map_location="cpu", weights_only=True) for p in (path, reference))
    assert got.keys() == want.keys() and got["meta"] == want["meta"] and got["format"] == want["format"]
    for part in ("student", "teacher", "bank"):
        assert got[part].keys() == want[part].keys(), part
        for key, value in want[part].items():  # the bank keeps counters beside its tensors
            same = torch.equal(got[part][key], value) if isinstance(value, torch.Tensor) else got[part][key] == value
            assert same, (path, part, key)


def leftovers(ws: Path) -> list[str]:
    """Temporaries of gpual.atomic, swap leftovers, per-epoch training states and staged maps."""
    from gpual.atomic import TEMP_NAME

    return sorted(str(p.relative_to(ws)) for p in ws.rglob("*")
                  if TEMP_NAME.match(p.name) or p.name.endswith(".old") or p.name in ("train_state.pt", ".partial"))


# --- the trials -----------------------------------------------------------------------------


def start(world: World, step: Step) -> subprocess.Popen:
    """``gpual STEP`` as a process, once it holds the workspace lock (or has exited).

    Its torch uses as many threads as this process's: a convolution's last bits depend on
    the thread count, and the trials finish in this process what the killed one began.
    """
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = subprocess.Popen([*GPUAL, step.args[0], str(world.ws), *step.args[1:]], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock, mark = world.ws / ".lock", f"(pid {proc.pid} "
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if mark in lock.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    return proc


def run_timed(world: World, step: Step) -> float:
    """Run ``step`` as a process, uninterrupted; seconds from taking the lock to its exit."""
    proc = start(world, step)
    began = time.perf_counter()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (step.name, err)
    return time.perf_counter() - began


def kill_during(world: World, step: Step, fraction: float) -> tuple[bool, str]:
    """Start ``step`` as a process and SIGKILL it ``fraction`` of its timed duration after it
    took the lock; (whether the kill came before it finished, its stderr)."""
    proc = start(world, step)
    time.sleep(fraction * world.seconds[step.name])
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    killed = proc.returncode == -signal.SIGKILL
    assert killed or proc.returncode == 0, err  # finished before the kill: an uninterrupted trial
    return killed, err


def rerun(capsys, world: World, step: Step) -> str:
    """Run ``step`` again; where it refuses, its one line must say how to go on, and that
    works. Returns what it took ("ran", "--resume", "already done")."""
    r = cli(capsys, world.ws, *step.args)
    if r.code == 0:
        return "ran"
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.err, r.err
    if "--resume" in lines[0]:  # a training killed after an epoch: continue it
        r = cli(capsys, world.ws, *step.args, "--resume")
        assert r.code == 0, r.err
        return "--resume"
    # killed after its commit: the step is done (a select's query, a label's answers, a checkpoint)
    done = {"select": "is already selected", "label": "is already labelled", "train": "this model is trained"}
    assert done.get(step.args[0], "\0") in lines[0], lines[0]
    return "already done"


@pytest.mark.parametrize("trial", range(len(TRIALS)), ids=[f"{i:02d}-{name.replace(' ', '-')}" for i, name in enumerate(TRIALS)])
def test_kill_9_then_rerun_gives_the_uninterrupted_files(capsys, world: World, trial: int) -> None:
    from gpual.workspace import Workspace

    step = BY_NAME[TRIALS[trial]]
    world.restore(step.name)
    killed, err = kill_during(world, step, float(FRACTIONS[trial]))
    left = leftovers(world.ws)

    r = cli(capsys, world.ws, "status")
    assert r.code == 0, r.err
    assert "running:" not in r.out and "wait:" not in r.out, r.out  # a dead process holds nothing
    assert Workspace.open(world.ws).holder() is None

    how = rerun(capsys, world, step)
    with capsys.disabled():  # which moment the seed picked and what it left, for whoever reads the log
        print(f" [{step.name}: {'killed' if killed else 'finished before the kill'} {FRACTIONS[trial]:.2f} x "
              f"{world.seconds[step.name]:.1f} s after taking the lock; left {left or 'nothing'}; re-run: {how}]", end="")
    # finish the round (`run` finishes every round itself)
    later = [s for s in STEPS if s.round == step.round and STEPS.index(s) > STEPS.index(step)] if step.args[0] != "run" else []
    for s in later:
        r = cli(capsys, world.ws, *s.args)
        assert r.code == 0, (s.name, r.err)
    assert leftovers(world.ws) == []
    assert_same_state(world.ws, world.reference, step.round)


# --- kills at chosen moments of a training --------------------------------------------------


@pytest.fixture(scope="module")
def state_after_an_epoch(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the train_state.pt that `gpual train --round 0` left when killed as soon as
    it appeared (after epoch 1 of 2, before the checkpoint); the workspace is left so."""
    world.restore("train 0")
    state = world.ws / "rounds" / "000" / "train_state.pt"
    proc = start(world, BY_NAME["train 0"])
    deadline = time.monotonic() + 600
    while proc.poll() is None and not state.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    # epoch 2 takes far longer than a few polls of 2 ms: the kill lands inside it
    assert proc.returncode == -signal.SIGKILL and state.exists(), err
    assert not (world.ws / "rounds" / "000" / "checkpoint.pt").exists()
    saved = tmp_path_factory.mktemp("state") / "train_state.pt"
    shutil.copy2(state, saved)
    return saved


def test_kill_after_an_epoch_resumes_to_the_uninterrupted_checkpoint(capsys, world: World, state_after_an_epoch: Path) -> None:
    """The resume path, every time (the seeded trials reach it only where their moment falls
    after an epoch): the plain re-run refuses in one line naming --resume, which continues
    from epoch 2 to the uninterrupted checkpoint."""
    step = BY_NAME["train 0"]
    world.restore("train 0")
    shutil.copy2(state_after_an_epoch, world.ws / "rounds" / "000" / "train_state.pt")
    assert cli(capsys, world.ws, "status").code == 0
    assert rerun(capsys, world, step) == "--resume"
    assert cli(capsys, world.ws, *BY_NAME["evaluate 0"].args).code == 0
    assert leftovers(world.ws) == []
    assert_same_state(world.ws, world.reference, 0)


def test_kill_between_the_checkpoint_and_the_state_removal(capsys, world: World, state_after_an_epoch: Path) -> None:
    """A kill after the checkpoint's rename but before train_state.pt is deleted (training's
    last two writes) leaves both: the round is trained, and the state must not stay behind
    for good (63-199 MB each time). Re-running train says it is trained; the next commands
    that take the lock must not leave the superseded state."""
    world.restore("evaluate 0")  # round 0 trained: metrics' training section and the checkpoint
    shutil.copy2(state_after_an_epoch, world.ws / "rounds" / "000" / "train_state.pt")
    assert cli(capsys, world.ws, "status").code == 0
    assert rerun(capsys, world, BY_NAME["train 0"]) == "already done"
    assert cli(capsys, world.ws, *BY_NAME["evaluate 0"].args).code == 0
    assert leftovers(world.ws) == [], "a superseded train_state.pt beside a finished checkpoint is never removed"
    assert_same_state(world.ws, world.reference, 0)


def test_kill_between_the_two_renames_of_a_folder_swap(capsys, world: World) -> None:
    """gpual.atomic.atomic_dir replaces a folder (the overlays) in two renames; a kill
    between them leaves no folder, its previous version as .NAME.old and the new one as a
    temporary (both kept by the lock's sweep: they are the only copies). The re-run commits
    new overlays, which supersede the old copy; the next lock sweeps the temporary."""
    world.restore("select 0")
    folder = world.ws / "rounds" / "000"
    for leftover in (folder / ".overlays.old", folder / ".overlays.abcd1234.tmp"):  # as the cut swap left them
        leftover.mkdir(parents=True)
        (leftover / "00_train_0000.png").write_bytes(b"an overlay of an earlier selection")
    assert cli(capsys, world.ws, "status").code == 0
    assert rerun(capsys, world, BY_NAME["select 0"]) == "ran"
    assert not (folder / ".overlays.old").exists()
    assert cli(capsys, world.ws, *BY_NAME["label 0"].args).code == 0  # takes the lock: sweeps the temporary
    assert leftovers(world.ws) == []
    overlays = sorted(p.relative_to(world.reference) for p in (world.reference / "rounds" / "000" / "overlays").iterdir())
    assert overlays and sorted(p.relative_to(world.ws) for p in (folder / "overlays").iterdir()) == overlays
    for name in overlays:
        assert (world.ws / name).read_bytes() == (world.reference / name).read_bytes(), name
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "query.parquet"),
                                  pd.read_parquet(world.reference / "rounds" / "000" / "query.parquet"))
