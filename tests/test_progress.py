"""cli.progress: rich bars in a terminal, throttled one-line progress in a log (injected clock)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from cli.progress import ENV_INTERVAL, eta_seconds, format_duration, interval_from_env, progress_bars
from cli_runner import run_cli
from gpual.errors import GpualError


class FakeClock:
    """A monotonic clock the test moves by hand: no sleeping, no timing dependence."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=60)


def lines(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


def test_start_throttled_and_final_lines() -> None:
    clock, console = FakeClock(), log_console()
    with progress_bars(console, interval=30, clock=clock) as bars:
        step = bars("train round 1", unit="steps")
        clock.now += 5  # setup before the first step: counted as elapsed
        step(1, 360)
        assert lines(console) == ["train round 1: 1/360 steps, 5s elapsed, ETA -"]
        for done in range(2, 30):  # 28 updates within 28 s of the start line: none printed
            clock.now += 1
            step(done, 360)
        assert len(lines(console)) == 1
        clock.now += 2  # 30 s after the start line
        step(30, 360)
        # 29 steps in 30 s since the first update: 330 left take 330 * 30 / 29 = 341 s.
        assert lines(console)[1] == "train round 1: 30/360 steps, 35s elapsed, ETA 5m41s"
        clock.now += 100
        step(360, 360)
        step(360, 360)  # a repeated last update: one completion line
    assert lines(console)[2:] == ["train round 1: 360/360 steps, 2m15s elapsed, ETA 0s"]


def test_one_line_per_update_at_interval_zero_and_details() -> None:
    clock, console = FakeClock(), log_console()
    with progress_bars(console, interval=0, clock=clock) as bars:
        step = bars("select round 2 (teacher forward)", unit="images", description="teacher forward")
        step.start()
        assert lines(console) == []  # a log line needs a done/total
        for done in range(1, 5):
            clock.now += 2
            step.note(description=f"batch {done}", detail="loss [bold]0.5[/]")
            step(done, 4)
    out = lines(console)
    # Long lines stay whole (soft wrap), markup is not interpreted, no escape codes.
    assert out == [
        "select round 2 (teacher forward): 1/4 images, 2s elapsed, ETA -; batch 1, loss [bold]0.5[/]",
        "select round 2 (teacher forward): 2/4 images, 4s elapsed, ETA 4s; batch 2, loss [bold]0.5[/]",
        "select round 2 (teacher forward): 3/4 images, 6s elapsed, ETA 2s; batch 3, loss [bold]0.5[/]",
        "select round 2 (teacher forward): 4/4 images, 8s elapsed, ETA 0s; batch 4, loss [bold]0.5[/]",
    ]
    assert "\x1b" not in console.file.getvalue()


def test_each_step_has_its_own_clock_and_lines() -> None:
    clock, console = FakeClock(), log_console()
    with progress_bars(console, interval=30, clock=clock) as bars:
        first = bars("train round 0")
        first(6, 6)  # complete at its first update: the one line is the completion line
        clock.now += 50
        second = bars("train round 1")
        clock.now += 3
        second(2, 6)
        second(6, 6)
    assert lines(console) == ["train round 0: 6/6 steps, 0s elapsed, ETA 0s",
                              "train round 1: 2/6 steps, 3s elapsed, ETA -",
                              "train round 1: 6/6 steps, 3s elapsed, ETA 0s"]


def test_eta_arithmetic_and_durations() -> None:
    assert eta_seconds(10.0, 0, 10.0, 0, 100) is None  # no rate before any work
    assert eta_seconds(10.0, 5, 20.0, 5, 100) is None  # no work since the first update
    assert eta_seconds(10.0, 5, 20.0, 25, 100) == pytest.approx(37.5)  # 2 per s, 75 left
    assert eta_seconds(10.0, 5, 20.0, 100, 100) == 0.0
    assert eta_seconds(10.0, 5, 20.0, 25, None) is None
    assert [format_duration(s) for s in (0, 44.6, 65, 3599, 3725)] == ["0s", "45s", "1m05s", "59m59s", "1h02m"]


def test_interval_from_the_environment() -> None:
    assert interval_from_env({}) == 30.0
    assert interval_from_env({ENV_INTERVAL: "0"}) == 0.0
    assert interval_from_env({ENV_INTERVAL: " 2.5 "}) == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(GpualError, match=ENV_INTERVAL) as caught:
            interval_from_env({ENV_INTERVAL: bad})
        assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


def test_terminal_gets_bars_not_log_lines() -> None:
    clock = FakeClock()
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with progress_bars(console, interval=0, clock=clock) as bars:
        for r in range(2):  # the next round's step reuses the bar of the same description
            step = bars(f"train round {r}", description="train")
            step(3, 6)
            clock.now += 7
            step(6, 6)
    out = console.file.getvalue()
    assert "train" in out and "6/6" in out and "0:00:07" in out  # rich's bar, its elapsed column restarted
    assert "train round" not in out and "ETA" not in out


@pytest.fixture()
def labeled_ws(tmp_path: Path):
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.oracle import label_round
    from gpual.superpixels import build_cache
    from gpual.synthetic import make_scenes
    from gpual.workspace import Workspace

    scenes = make_scenes(tmp_path / "scenes", n_train=6, n_val=2, height=48, width=64).root
    ws = Workspace.create(tmp_path / "ws", make_config("demo", {"data": {"root": str(scenes), "dataset": "folder"}}))
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=40)
    label_round(ws, 0)
    return ws


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_train_writes_progress_lines_to_a_log(capsys, monkeypatch, labeled_ws) -> None:
    # capsys's stdout is no terminal, as a log file or `| tee` is not.
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    before = _files(labeled_ws.root)
    monkeypatch.setenv(ENV_INTERVAL, "later")
    r = run_cli(capsys, "train", labeled_ws.root, "--round", "0", "--epochs", "1", "--device", "cpu")
    assert r.code == 2 and ENV_INTERVAL in r.err, (r.out, r.err)
    assert r.err.strip().startswith("error:") and len(r.err.strip().splitlines()) == 1
    assert _files(labeled_ws.root) == before

    monkeypatch.setenv(ENV_INTERVAL, "0")
    r = run_cli(capsys, "train", labeled_ws.root, "--round", "0", "--epochs", "2", "--device", "cpu")
    assert r.code == 0, r.err
    pattern = re.compile(r"train round 0: (\d+)/(\d+) steps, \S+ elapsed, ETA (\S+); "
                         r"epoch (\d)/2 batch \d+/\d+, loss \d\S* \(ce \S+, nce \S+\)")
    progress = [m for m in map(pattern.fullmatch, r.out.splitlines()) if m]
    assert progress, r.out
    total = int(progress[0].group(2))
    assert total >= 2 and [int(m.group(1)) for m in progress] == list(range(1, total + 1))  # a line per step
    assert progress[0].group(3) == "-" and progress[-1].group(3) == "0s" and progress[-1].group(4) == "2"
    assert "trained 2 epochs" in r.out and "\x1b" not in r.out


def test_run_steps_are_named_with_the_round_they_work_on(tmp_path: Path) -> None:
    from cli.acquire import _loop_progress
    from gpual.config import make_config
    from gpual.workspace import Workspace

    ws = Workspace.create(tmp_path / "ws", make_config("demo", {"data": {"root": str(tmp_path), "dataset": "folder"}}))
    clock, console = FakeClock(), log_console()
    with progress_bars(console, interval=0, clock=clock) as bars:
        progress = _loop_progress(ws, bars)
        for step, round in (("superpixels", None), ("select", 2), ("train", 1), ("final", 2)):
            progress(step, round)(1, 2)
    assert [line.split(",")[0] for line in lines(console)] == [
        "superpixels: 1/2 images", "select round 2 (teacher forward): 1/2 images", "train round 1: 1/2 steps",
        "train round 2 (final retraining): 1/2 steps"]
