"""benchmarks/al_curve.py's equal-cost protocol: paired statistics on hand-made numbers,
equal-pixel budgets giving every strategy the same x, the two-panel plot, and one small
synthetic run end to end."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpual.backend import cpu_backend
from gpual.config import make_config
from gpual.acquisition.pooling import RegionStats
from gpual.acquisition.strategies import STRATEGY_NAMES, select_regions
from gpual.workspace import Workspace

from test_benchmarks import _finished_round_zero, _load

T_975 = {1: 12.706204736174707, 2: 4.302652729749464}  # Student's t, two-sided 95%, by degrees of freedom


def _row(r: int, share: float, regions: int, miou: float, final: float | None = None) -> dict:
    return {"round": r, "labeled_share": share, "labeled_regions": regions, "miou": miou, "epochs_trained": r + 1,
            "final_miou": final, "final_epochs": None if final is None else 9}


def _curves() -> dict:
    """Two seeds. Seed 0: random at 1, 2, 3% -> 0.20, 0.28, 0.36; "a" at 1, 3, 5% -> 0.2, 0.4, 0.5,
    so at random's 2% and 3% it reads 0.30 and 0.40: differences 0, +0.02, +0.04. Seed 1:
    random at 1.2, 2.2, 3.2% -> 0.22, 0.30, 0.40; "a" at 1.2, 3.2, 5.2% -> 0.22, 0.42, 0.50:
    0.32 and 0.42 there, differences 0, +0.02, +0.02. Clicks: random 100, 200, 300 regions,
    "a" 100, 150, 200 (so at 300 it has no value)."""
    return {
        "random": [[_row(0, 0.010, 100, 0.20), _row(1, 0.020, 200, 0.28), _row(2, 0.030, 300, 0.36, 0.38)],
                   [_row(0, 0.012, 100, 0.22), _row(1, 0.022, 200, 0.30), _row(2, 0.032, 300, 0.40, 0.40)]],
        "a": [[_row(0, 0.010, 100, 0.20), _row(1, 0.030, 150, 0.40), _row(2, 0.050, 200, 0.50, 0.44)],
              [_row(0, 0.012, 100, 0.22), _row(1, 0.032, 150, 0.42), _row(2, 0.052, 200, 0.50, 0.40)]],
    }


def test_paired_interval_is_the_t_interval_of_the_mean() -> None:
    al_curve = _load("al_curve")
    got = al_curve.paired_interval([0.01, 0.03, 0.02])
    half = T_975[2] * 0.01 / math.sqrt(3)  # standard deviation 0.01
    assert got["n"] == 3 and got["method"] == "t" and got["mean"] == pytest.approx(0.02, abs=1e-15)
    assert got["low"] == pytest.approx(0.02 - half, abs=1e-12) and got["high"] == pytest.approx(0.02 + half, abs=1e-12)
    assert al_curve.paired_interval([0.02, 0.02, 0.02])["low"] == pytest.approx(0.02, abs=1e-15)  # no spread
    one = al_curve.paired_interval([0.5, None, float("nan")])  # missing values left out
    assert one["n"] == 1 and one["mean"] == 0.5 and one["low"] is None and one["high"] is None
    assert al_curve.paired_interval([])["mean"] is None


def test_paired_interval_falls_back_to_a_seeded_bootstrap_without_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    al_curve = _load("al_curve")
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy -> ImportError
    values = [0.01, 0.03, 0.02, 0.05]
    got = al_curve.paired_interval(values)
    assert got["method"] == "bootstrap" and got["mean"] == pytest.approx(0.0275)
    assert 0.01 <= got["low"] < 0.0275 < got["high"] <= 0.05
    assert al_curve.paired_interval(values) == got  # seeded: the same interval every time


def test_equal_cost_reads_every_curve_at_the_references_x_seed_by_seed() -> None:
    al_curve = _load("al_curve")
    pixels = al_curve.equal_cost(_curves(), "random", "pixels")
    assert pixels["x"] == pytest.approx([0.011, 0.021, 0.031])
    assert pixels["x_per_seed"] == [[0.010, 0.020, 0.030], [0.012, 0.022, 0.032]]
    a = pixels["strategies"]["a"]
    np.testing.assert_allclose(np.array(a["miou_per_seed"], dtype=float), [[0.20, 0.30, 0.40], [0.22, 0.32, 0.42]], atol=1e-12)
    np.testing.assert_allclose(np.array(a["difference_per_seed"], dtype=float), [[0, 0.02, 0.04], [0, 0.02, 0.02]], atol=1e-12)
    assert [d["mean"] for d in a["difference"]] == pytest.approx([0.0, 0.02, 0.03], abs=1e-12)
    last = a["difference"][2]  # 0.04 and 0.02: standard deviation 0.01 * sqrt(2), n = 2
    half = T_975[1] * 0.01 * math.sqrt(2) / math.sqrt(2)
    assert (last["low"], last["high"]) == pytest.approx((0.03 - half, 0.03 + half), abs=1e-12)
    assert a["difference"][1]["low"] == pytest.approx(0.02, abs=1e-12)  # the same gain in both seeds
    assert [m["mean"] for m in a["miou"]] == pytest.approx([0.21, 0.31, 0.41], abs=1e-12)
    reference = pixels["strategies"]["random"]
    assert [d["mean"] for d in reference["difference"]] == [0.0, 0.0, 0.0]

    clicks = al_curve.equal_cost(_curves(), "random", "clicks")
    assert clicks["x"] == [100.0, 200.0, 300.0]
    # "a" has 200 regions at most: read at 200 (its last round), nothing at 300.
    assert clicks["strategies"]["a"]["miou_per_seed"] == [[0.2, 0.5, None], [0.22, 0.5, None]]
    assert clicks["strategies"]["a"]["difference"][2]["n"] == 0
    assert clicks["strategies"]["a"]["difference"][1]["mean"] == pytest.approx(0.21, abs=1e-12)


def test_curves_are_read_within_their_rounds_and_a_quarter_segment_beyond() -> None:
    al_curve = _load("al_curve")
    run = [_row(0, 0.01, 10, 0.2), _row(1, 0.02, 20, 0.3), _row(2, 0.04, 30, 0.5)]
    got = al_curve.at_cost(run, "labeled_share", [0.007, 0.008, 0.015, 0.03, 0.045, 0.0451, None])
    assert got[0] is None and got[5] is None and got[6] is None  # beyond a quarter of the end segment
    assert got[1:5] == pytest.approx([0.18, 0.25, 0.4, 0.55])  # 0.008 and 0.045: the end segments extended
    assert al_curve.at_cost(run[:1], "labeled_share", [0.01, 0.0101]) == [0.2, None]  # one round: that point only


def test_final_comparison_and_the_equal_cost_tables() -> None:
    al_curve = _load("al_curve")
    final = al_curve.final_comparison(_curves(), "random", 0.4)
    assert final["round"] == 2
    a = final["strategies"]["a"]
    assert a["ratio_to_full"]["mean"] == pytest.approx(1.05) and a["ratio_to_full"]["n"] == 2
    assert a["difference"]["mean"] == pytest.approx(0.03)  # +0.06 and 0.00 against random's 0.38, 0.40
    assert a["labeled_share"] == pytest.approx(0.051)
    assert al_curve.final_comparison({"random": [[_row(0, 0.01, 10, 0.2)]]}, "random", 0.4) is None

    table = al_curve.markdown_equal_cost(al_curve.equal_cost(_curves(), "random", "pixels"))
    assert "| a | 1 | 2.10% | 0.3100 | 2 | +0.0200 | [+0.0200, +0.0200] | +0.0200 / +0.0200 |" in table
    assert "| a | 2 | 3.10% | 0.4100 | 2 | +0.0300 | [-0.0971, +0.1571] | +0.0400 / +0.0200 |" in table
    assert "| random | 2 | 3.10% | 0.3800 | 2 | (reference) | - | - |" in table
    clicks = al_curve.markdown_equal_cost(al_curve.equal_cost(_curves(), "random", "clicks"))
    assert "| a | 2 | 300 | - | 0 | - | - | - / - |" in clicks
    text = al_curve.markdown_final(final)
    assert "| a | 5.10% | 105.0% | [41.5%, 168.5%] | 110.0% / 100.0% | 2 | +0.0300 | [-0.3512, +0.4112] | +0.0600 / +0.0000 |" in text
    assert "| random | 3.10% | 97.5% | [65.7%, 129.3%] | 95.0% / 100.0% | 2 | (reference) | - | - |" in text


def test_the_plot_has_the_curves_and_the_paired_differences(tmp_path: Path) -> None:
    al_curve = _load("al_curve")
    curves = _curves()
    path = tmp_path / "curve.png"
    fig = al_curve.plot(al_curve.equal_cost(curves, "random"), 0.4, path, al_curve.final_comparison(curves, "random", 0.4))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2
    curve, gap = fig.axes
    assert curve.get_xlabel() == "labelled pixels (% of pool)" and "paired" in gap.get_ylabel()
    np.testing.assert_allclose(curve.lines[0].get_xdata(), [1.1, 2.1, 3.1])
    np.testing.assert_allclose(gap.lines[0].get_ydata(), [0.0, 0.02, 0.03], atol=1e-12)  # "a" minus random
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in gap.lines)  # the zero line


def _pool(n: int = 400, seed: int = 0) -> tuple[RegionStats, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(20, 400, (n,), generator=g)
    entropy_mean = torch.rand(n, generator=g)
    stats = RegionStats(embedding=torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=1),
                        entropy_sum=entropy_mean * pixels, entropy_mean=entropy_mean,
                        margin_mean=torch.rand(n, generator=g), maxprob_mean=0.5 + 0.5 * torch.rand(n, generator=g),
                        bald=torch.rand(n, generator=g) * pixels, pixels=pixels,
                        class_votes=torch.rand(n, 4, generator=g))
    return stats, torch.arange(n)


def test_a_pixel_budget_gives_every_strategy_the_same_pixels_within_a_region() -> None:
    """The sum score prefers large regions and the mean score small ones: with a budget in
    regions they label very different pixels; with one in pixels all land just under it."""
    stats, candidates = _pool()
    cap, biggest = 8000, int(stats.pixels.max())
    totals = {}
    for strategy in STRATEGY_NAMES:
        if strategy == "umap-kmeans-entropy":
            continue  # kmeans-entropy runs the same ranking; UMAP's first fit compiles for tens of seconds
        for score in ("sum", "mean"):
            picked = select_regions(strategy, cpu_backend(), stats, candidates, 20, region_score=score, budget_pixels=cap,
                                    class_balance=0.5, class_pixels=torch.tensor([5.0, 1.0, 0.0, 2.0])).indices
            assert len(set(picked.tolist())) == len(picked)
            totals[strategy, score] = int(stats.pixels[picked].sum())
    assert all(cap - biggest < total <= cap for total in totals.values()), totals
    regions = {score: int(stats.pixels[select_regions("entropy", cpu_backend(), stats, candidates, 40,
                                                      region_score=score).indices].sum()) for score in ("sum", "mean")}
    assert regions["sum"] > 1.3 * regions["mean"]  # what a budget in regions would have compared (13.5k vs 8.7k px)


def test_round_zero_is_shared_across_budget_units_and_old_workspaces_run_as_before(tmp_path: Path) -> None:
    al_curve = _load("al_curve")
    _finished_round_zero(tmp_path / "a", "random")
    pixels = Workspace.create(tmp_path / "b", make_config("demo", {"acquisition": {
        "strategy": "entropy", "budget_unit": "pixels", "budget_pixels": 0.02, "class_balance": 1.0,
        "clusters_per_budget": 0.5}}))
    assert al_curve.share_round_zero_from_any(tmp_path, pixels).root == tmp_path / "a"
    # A gpual.toml written before the new keys ran with budgets in regions and no class balance
    # (and streamed its training images: train.resident changes speed, never numbers).
    config = make_config("demo")
    ws = al_curve.open_or_create(tmp_path / "old", config)
    path = ws.root / "gpual.toml"
    text = path.read_text()
    for line in ('budget_unit = "regions"\n', "budget_pixels = 0.01\n", "class_balance = 0.0\n", "clusters_per_budget = 1.0\n",
                 'resident = "auto"\n'):
        assert line in text
        text = text.replace(line, "")
    path.write_text(text)
    assert al_curve.open_or_create(tmp_path / "old", config).root == ws.root
    assert al_curve.open_or_create(tmp_path / "old", make_config("demo", {"train": {"resident": False}})).root == ws.root
    with pytest.raises(Exception, match=r"acquisition.budget_unit \(not in its gpual.toml"):
        al_curve.open_or_create(tmp_path / "old", make_config("demo", {"acquisition": {"budget_unit": "pixels"}}))


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """al_curve on 4 tiny synthetic scenes: entropy and random, one seed, 3 rounds, a pixel
    schedule of 3% then 5% of the pixels."""
    from gpual.synthetic import make_scenes

    root = tmp_path_factory.mktemp("al_curve")
    al_curve = _load("al_curve")
    report = sys.modules["_report"]
    make_scenes(root / "data", n_train=4, n_val=1, height=32, width=48)
    argv = ["al_curve", "--data", str(root / "data"), "--dataset", "folder", "--preset", "demo",
            "--strategies", "entropy,random", "--seeds", "0", "--rounds", "3", "--budget-pixels", "3%,5%",
            "--init-budget", "20", "--device", "cpu", "--out", str(root / "out"),
            "--set", "train.epochs_per_round=1", "--set", "train.final_epochs=1", "--set", "superpixels.workers=1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "RESULTS_DIR", root / "results")
        mp.setattr(al_curve, "machine_info", lambda: {})  # its version probes import every library: seconds
        mp.setattr(sys, "argv", argv)
        al_curve.main()
    (path,) = (root / "results").glob("al_curve-*.json")
    return {"payload": json.loads(path.read_text()), "path": path}


def test_a_synthetic_equal_cost_run_writes_the_comparison_and_two_panels(synthetic_run: dict) -> None:
    payload, path = synthetic_run["payload"], synthetic_run["path"]
    assert payload["budget_pixels"] == pytest.approx([0.03, 0.05]) and payload["seeds"] == [0]
    pixels = payload["equal_cost"]["pixels"]
    assert pixels["reference"] == "random (pixels=3%-5%,train.epochs_per_round=1,train.final_epochs=1)"
    assert set(payload["equal_cost"]) == {"pixels", "clicks"} and len(pixels["x"]) == 3
    table = path.with_suffix(".md").read_text()
    assert "At equal labelled pixels" in table and "At equal clicks" in table
    # In the equal-cost table every strategy's row of a round shows the same x.
    section = table.split("At equal labelled pixels")[1].split("At equal clicks")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and line.split(" | ")[1].isdigit()]
    assert len(rows) == 6 and {cells[0] for cells in rows} == {"| entropy (pixels=3%-5%,train.epochs_per_round=1,train.final_epochs=1)",
                                                                "| random (pixels=3%-5%,train.epochs_per_round=1,train.final_epochs=1)"}
    assert len({(cells[1], cells[2]) for cells in rows}) == 3
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_a_synthetic_equal_cost_run_labels_equal_pixels_in_every_strategy(synthetic_run: dict) -> None:
    payload = synthetic_run["payload"]
    assert all(payload["pixel_budget_honoured"].values())
    shares = {label: [row["labeled_share"] for row in runs[0]] for label, runs in payload["curves"].items()}
    (a, b) = shares.values()
    assert a[0] == b[0]  # the shared round 0
    # Round 1 labels 3% at most and round 2 5% (of 4 x 32 x 48 = 6144 pixels: 184 and 307),
    # each short of its budget by less than a region (the demo's regions are about 64
    # pixels: 1%; 2% leaves room for the largest).
    for s in (a, b):
        assert [budget - 0.02 < y - x <= budget + 1e-9 for x, y, budget in zip(s, s[1:], (0.03, 0.05))] == [True, True]


def test_a_pixel_schedule_gives_each_round_its_share_and_refuses_a_wrong_length() -> None:
    al_curve = _load("al_curve")
    assert al_curve.pixel_schedule("1%", 4) == ["1%", "1%", "1%"]
    assert al_curve.pixel_schedule("1%, 2%,0.04", 4) == ["1%", "2%", "0.04"]
    assert al_curve.pixel_schedule("1%", 1) == []
    with pytest.raises(al_curve.GpualError, match="gives 2 shares for the 3 rounds after round 0"):
        al_curve.pixel_schedule("1%,2%", 4)
    with pytest.raises(al_curve.GpualError, match="is not a share"):
        al_curve.pixel_schedule("1%,two", 3)
    # Per-round caps: 1% then 2% of 10,000 pixels (100 and 200 pixels).
    rows = [{"labeled_share": x} for x in (0.010, 0.0195, 0.0390)]
    assert al_curve.within_budget(rows, [0.01, 0.02], 10_000)
    assert not al_curve.within_budget(rows, [0.01, 0.01], 10_000)  # round 2 took 195 pixels of a 100 cap
