"""Every strategy on small pooled statistics: exact budgets, the right picks, clear errors.

umap-learn compiles with numba on its first fit (tens of seconds), so the paper's strategy
runs once per module (fixture ``umap_selection``) and the other UMAP fits are on tiny data.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpual.backend import cpu_backend
from gpual.acquisition import clustering
from gpual.acquisition.clustering import kmeans_labels, resolve_levels
from gpual.config import KMeansConfig, UmapConfig
from gpual.acquisition.reduction import umap_embed
from gpual.errors import GpualError
from gpual.acquisition.pooling import RegionStats
from gpual.acquisition.ranking import select_per_cluster
from gpual.acquisition.strategies import STRATEGY_NAMES, kcenter_greedy, select_regions

N_REGIONS, DIM, N_CLASSES, BUDGET = 300, 16, 5, 10


class Pool:
    """Pooled stats of 300 regions around 5 class centres, a 200-vector bank, candidates."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        centres = torch.nn.functional.normalize(torch.randn(N_CLASSES, DIM, generator=g), dim=1)

        def around(cls: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(centres[cls] + 0.15 * torch.randn(len(cls), DIM, generator=g), dim=1)

        self.region_class = torch.arange(N_REGIONS) % N_CLASSES
        pixels = torch.randint(100, 500, (N_REGIONS,), generator=g)
        entropy_mean = torch.rand(N_REGIONS, generator=g)
        # Class 0 is the most uncertain: pure entropy ranking crowds into it.
        entropy_mean[self.region_class == 0] += 2.0
        self.stats = RegionStats(
            embedding=around(self.region_class),
            entropy_sum=entropy_mean * pixels,
            entropy_mean=entropy_mean,
            margin_mean=torch.rand(N_REGIONS, generator=g),
            maxprob_mean=0.5 + 0.5 * torch.rand(N_REGIONS, generator=g),
            bald=torch.rand(N_REGIONS, generator=g) * pixels,
            pixels=pixels,
        )
        self.bank = around(torch.arange(200) % N_CLASSES)
        # Every third region is labeled; the rest are candidates.
        labeled = torch.arange(N_REGIONS) % 3 == 0
        self.candidates = torch.nonzero(~labeled).squeeze(1)
        self.labeled_embedding = self.stats.embedding[labeled]

    def select(self, strategy: str, budget: int = BUDGET, **kwargs) -> object:
        args = dict(bank_vectors=self.bank, region_score="sum", umap_cfg=UmapConfig(), kmeans_cfg=KMeansConfig(),
                    seed=0, labeled_embedding=self.labeled_embedding)
        args.update(kwargs)
        return select_regions(strategy, cpu_backend(), self.stats, self.candidates, budget, **args)


@pytest.fixture(scope="module")
def pool() -> Pool:
    return Pool()


@pytest.fixture(scope="module")
def umap_selection(pool: Pool) -> object:
    return pool.select("umap-kmeans-entropy")


def _selected(pool: Pool, selection) -> np.ndarray:
    """Global region ids of a selection."""
    return pool.candidates.numpy()[selection.indices]


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_returns_budget_distinct_candidate_positions(pool: Pool, umap_selection, strategy: str) -> None:
    selection = umap_selection if strategy == "umap-kmeans-entropy" else pool.select(strategy)
    idx = selection.indices
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64 and idx.shape == (BUDGET,)
    assert len(np.unique(idx)) == BUDGET
    assert idx.min() >= 0 and idx.max() < len(pool.candidates)
    assert selection.scores.dtype == np.float32 and selection.scores.shape == (BUDGET,)
    assert {"handoff", "ranking"} <= set(selection.timings)
    assert all(v >= 0 for v in selection.timings.values())


def test_umap_kmeans_entropy_spreads_over_classes_where_entropy_crowds(pool: Pool, umap_selection) -> None:
    assert set(umap_selection.timings) == {"handoff", "umap_fit", "umap_transform", "kmeans", "ranking"}
    entropy = pool.select("entropy")
    classes = pool.region_class.numpy()
    assert set(classes[_selected(pool, entropy)]) == {0}
    assert len(set(classes[_selected(pool, umap_selection)])) >= 4
    # Picks are ordered by H(S), and each score is the region's H(S).
    h = pool.stats.entropy_sum.numpy()[_selected(pool, umap_selection)]
    np.testing.assert_array_equal(umap_selection.scores, h)
    assert np.all(np.diff(umap_selection.scores) <= 0)


def test_entropy_is_top_k_of_the_candidates(pool: Pool) -> None:
    cand = pool.candidates.numpy()
    for region_score, field in (("sum", "entropy_sum"), ("mean", "entropy_mean")):
        h = getattr(pool.stats, field).numpy()[cand]
        selection = pool.select("entropy", region_score=region_score)
        assert selection.indices.tolist() == np.argsort(-h, kind="stable")[:BUDGET].tolist()
        np.testing.assert_array_equal(selection.scores, h[selection.indices])


@pytest.mark.parametrize(
    ("strategy", "score"),
    [
        ("margin", lambda s: -s.margin_mean),
        ("least-confidence", lambda s: 1 - s.maxprob_mean),
        ("bald", lambda s: s.bald),
    ],
)
def test_uncertainty_baselines_rank_their_score(pool: Pool, strategy: str, score) -> None:
    want = score(pool.stats).numpy()[pool.candidates.numpy()]
    selection = pool.select(strategy)
    assert selection.indices.tolist() == np.argsort(-want, kind="stable")[:BUDGET].tolist()
    np.testing.assert_allclose(selection.scores, want[selection.indices])


def test_bald_mean_divides_by_pixels(pool: Pool) -> None:
    cand = pool.candidates.numpy()
    want = (pool.stats.bald / pool.stats.pixels).numpy()[cand]
    selection = pool.select("bald", region_score="mean")
    assert selection.indices.tolist() == np.argsort(-want, kind="stable")[:BUDGET].tolist()


def test_kmeans_entropy_is_kmeans_then_cluster_argmax(pool: Pool) -> None:
    selection = pool.select("kmeans-entropy")
    cand = pool.candidates
    points = pool.stats.embedding[cand].numpy()
    labels = kmeans_labels(cpu_backend(), points, BUDGET, KMeansConfig())
    want = select_per_cluster(pool.stats.entropy_sum[cand].numpy(), labels, BUDGET, BUDGET)
    assert selection.indices.tolist() == want.tolist()
    assert set(selection.timings) == {"handoff", "kmeans", "ranking"}


def _naive_kcenter(points: np.ndarray, budget: int, centres: np.ndarray) -> list[int]:
    dist = np.full(len(points), np.inf)
    for c in centres:
        dist = np.minimum(dist, ((points - c) ** 2).sum(1))
    picks = []
    for _ in range(budget):
        masked = dist.copy()
        masked[picks] = -1
        j = int(np.argmax(masked))
        picks.append(j)
        dist = np.minimum(dist, ((points - points[j]) ** 2).sum(1))
    return picks


def test_coreset_is_k_center_greedy_from_the_labeled_set(pool: Pool) -> None:
    selection = pool.select("coreset")
    points = pool.stats.embedding[pool.candidates].double().numpy()
    assert selection.indices.tolist() == _naive_kcenter(points, BUDGET, pool.labeled_embedding.double().numpy())
    assert np.all(np.diff(selection.scores) <= 1e-6)  # greedy distances never grow


def test_kcenter_greedy_small_cases() -> None:
    points = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 3.0]], dtype=np.float32)
    idx, dist = kcenter_greedy(points, 3)
    assert idx.tolist() == [0, 2, 3] and np.isinf(dist[0]) and dist[1:].tolist() == [5.0, 3.0]
    idx, dist = kcenter_greedy(points, 2, centres=np.array([[5.0, 0.0]], dtype=np.float32))
    # from (5,0): (0,3) is farthest (sqrt 34); then (1,0) at sqrt 10 from (0,3) beats (0,0) at 3.
    assert idx.tolist() == [3, 1]
    np.testing.assert_allclose(dist, [np.sqrt(34), np.sqrt(10)], rtol=1e-6)
    # Identical points: every distance is 0, picks must still be distinct.
    same = np.ones((6, 3), dtype=np.float32)
    idx, _ = kcenter_greedy(same, 6, centres=same[:2])
    assert sorted(idx.tolist()) == list(range(6))


def test_random_is_seeded_and_distinct(pool: Pool) -> None:
    a, b, c = pool.select("random", seed=3), pool.select("random", seed=3), pool.select("random", seed=4)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices.tolist() != c.indices.tolist()
    everything = pool.select("random", budget=len(pool.candidates))
    assert sorted(everything.indices.tolist()) == list(range(len(pool.candidates)))


def test_umap_spectral_fallback_is_one_note_and_other_warnings_pass(pool: Pool) -> None:
    import warnings

    from gpual.acquisition.reduction import SPECTRAL_NOTE

    def transform(reducer, regions):
        # umap-learn's own message (raised in its layout code), twice, and an unrelated warning.
        for _ in range(2):
            warnings.warn("Spectral initialisation failed! The eigenvector solver\nfailed.", UserWarning)
        warnings.warn("something else", RuntimeWarning)
        return reducer.transform(regions)

    with pytest.warns(RuntimeWarning, match="something else") as record:
        out = umap_embed(cpu_backend(), pool.bank.numpy(), pool.stats.embedding[:20].numpy(), UmapConfig(), transform=transform)
    assert out.notes == [SPECTRAL_NOTE]
    assert not [w for w in record if "Spectral" in str(w.message)]


def test_umap_embed_output_and_small_bank_clamp(pool: Pool) -> None:
    backend = cpu_backend()
    regions = pool.stats.embedding[:20].numpy()
    out = umap_embed(backend, pool.bank[:6].numpy(), regions, UmapConfig(n_components=3))
    assert isinstance(out.points, np.ndarray) and out.points.shape == (20, 3) and out.points.dtype == np.float32
    assert np.isfinite(out.points).all()
    assert out.notes and "clamped to 5" in out.notes[0]
    assert set(out.timings) == {"umap_fit", "umap_transform"}
    with pytest.raises(GpualError, match="holds 2 vectors"):
        umap_embed(backend, pool.bank[:2].numpy(), regions, UmapConfig())
    with pytest.raises(GpualError, match="16 dims but region embeddings have 8"):
        umap_embed(backend, pool.bank.numpy(), regions[:, :8], UmapConfig())


def test_kmeans_labels_range_and_budget_check() -> None:
    points = np.random.default_rng(0).normal(size=(30, 2)).astype(np.float32)
    labels = kmeans_labels(cpu_backend(), points, 4, KMeansConfig())
    assert labels.dtype == np.int64 and labels.shape == (30,) and set(labels.tolist()) == {0, 1, 2, 3}
    # An internal check: select_regions and gpual.acquisition.select.resolve_budget refuse the user's budget first.
    with pytest.raises(ValueError, match="k = 31 clusters is more than the 30 points"):
        kmeans_labels(cpu_backend(), points, 31, KMeansConfig())


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_kmeans_init_and_tol_reach_the_estimator(init: str) -> None:
    from sklearn.cluster import KMeans

    points = np.random.default_rng(1).normal(size=(200, 2)).astype(np.float32)
    cfg = KMeansConfig(init=init, tol=1e-2, max_iter=50, random_state=3)
    expected = KMeans(n_clusters=7, init=init, tol=1e-2, max_iter=50, n_init=1, random_state=3).fit_predict(points)
    np.testing.assert_array_equal(kmeans_labels(cpu_backend(), points, 7, cfg), expected)


def test_errors(pool: Pool) -> None:
    # What the user chooses is validated at the edge (config, resolve_budget): here a
    # broken precondition is a caller's bug (ValueError); what depends on the workspace's
    # state is the user's one-line GpualError.
    with pytest.raises(ValueError, match="unknown strategy 'best'"):
        pool.select("best")
    m = len(pool.candidates)
    with pytest.raises(ValueError, match=f"budget of {m + 1} regions is larger than the {m} candidate regions"):
        pool.select("entropy", budget=m + 1)
    with pytest.raises(ValueError, match="must be positive"):
        pool.select("entropy", budget=0)
    no_bald = RegionStats(**{**pool.stats.__dict__, "bald": None})
    with pytest.raises(GpualError, match="bald needs Monte-Carlo dropout"):
        select_regions("bald", cpu_backend(), no_bald, pool.candidates, BUDGET)
    with pytest.raises(GpualError, match="needs the memory bank"):
        pool.select("umap-kmeans-entropy", bank_vectors=None)
    with pytest.raises(ValueError, match="region score 'max'"):
        pool.select("entropy", region_score="max")


def test_group_shares_sum_to_k_within_bounds() -> None:
    from gpual.acquisition.clustering import group_shares

    assert group_shares(10, np.array([50, 30, 20])).tolist() == [5, 3, 2]
    assert group_shares(4, np.array([100, 0, 1, 1])).tolist() == [2, 0, 1, 1]  # one each first, none when empty
    assert group_shares(6, np.array([1, 5, 2])).tolist() == [1, 3, 2]  # never more than a group holds
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(0, 40, rng.integers(1, 12))
        if sizes.sum() == 0:
            continue
        k = int(rng.integers((sizes > 0).sum(), sizes.sum() + 1))
        shares = group_shares(k, sizes)
        assert shares.sum() == k and (shares <= sizes).all() and ((shares >= 1) == (sizes > 0)).all()
    with pytest.raises(ValueError):
        group_shares(3, np.array([1, 1]))


def test_two_level_kmeans_gives_k_clusters_close_to_flat_kmeans() -> None:
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 20, (12, 2))
    points = (centres[rng.integers(0, 12, 3000)] + rng.normal(0, 0.6, (3000, 2))).astype(np.float32)
    labels = kmeans_labels(cpu_backend(), points, 100, KMeansConfig(levels=2))
    assert labels.dtype == np.int64 and set(labels.tolist()) == set(range(100))

    def inertia(assigned: np.ndarray) -> float:
        return sum(float(((points[assigned == j] - points[assigned == j].mean(0)) ** 2).sum()) for j in range(100))

    flat = KMeans(100, n_init=1, random_state=0).fit_predict(points)
    assert inertia(labels) < 1.1 * inertia(flat)  # 0.5% above here; 5% on 150k points, k = 1,600
    np.testing.assert_array_equal(kmeans_labels(cpu_backend(), points, 100, KMeansConfig(levels=2)), labels)  # seeded
    # k = the number of points: each point its own cluster.
    assert sorted(kmeans_labels(cpu_backend(), points[:9], 9, KMeansConfig(levels=2)).tolist()) == list(range(9))


def test_auto_levels_switch_to_two_levels_above_the_threshold(pool: Pool, monkeypatch) -> None:
    assert KMeansConfig().levels == "auto"
    assert resolve_levels("auto", 160_000, 1_600) == 1  # a CamVid pool keeps the method's one KMeans
    assert resolve_levels("auto", 4_000_000, 40_000) == 2  # Cityscapes-size
    assert resolve_levels(1, 4_000_000, 40_000) == 1 and resolve_levels(2, 100, 10) == 2
    cand = pool.candidates
    points = pool.stats.embedding[cand].numpy()
    one, two = (kmeans_labels(cpu_backend(), points, BUDGET, KMeansConfig(levels=v)) for v in (1, 2))
    assert not np.array_equal(one, two)
    np.testing.assert_array_equal(kmeans_labels(cpu_backend(), points, BUDGET, KMeansConfig()), one)
    assert not any("two levels" in note for note in pool.select("kmeans-entropy").notes)

    monkeypatch.setattr(clustering, "TWO_LEVELS_ABOVE", len(cand) * BUDGET - 1)
    np.testing.assert_array_equal(kmeans_labels(cpu_backend(), points, BUDGET, KMeansConfig()), two)
    selection = pool.select("kmeans-entropy")
    want = select_per_cluster(pool.stats.entropy_sum[cand].numpy(), two, BUDGET, BUDGET)
    assert selection.indices.tolist() == want.tolist()
    assert [note for note in selection.notes if "two levels" in note] == [
        f"KMeans in two levels ({len(cand)} regions x {BUDGET} clusters > {len(cand) * BUDGET - 1:.0e}, "
        'kmeans.levels = "auto"): set kmeans.levels = 1 in gpual.toml for one'
    ]


def test_umap_init_reaches_the_estimator_and_the_default_repeats(pool: Pool) -> None:
    """The default initial layout (random, from random_state) gives the same points twice;
    umap-learn's spectral layout did not on the demo's round-1 memory bank (72 duplicate
    vectors: two selections of one round shared 40-44 of 60 regions)."""
    seen = []

    def transform(reducer, regions):
        seen.append(reducer.init)
        return reducer.transform(regions)

    regions = pool.stats.embedding[:40].numpy()
    first = umap_embed(cpu_backend(), pool.bank.numpy(), regions, UmapConfig(), transform=transform)
    again = umap_embed(cpu_backend(), pool.bank.numpy(), regions, UmapConfig(), transform=transform)
    umap_embed(cpu_backend(), pool.bank.numpy(), regions, UmapConfig(init="spectral"), transform=transform)
    assert seen == ["random", "random", "spectral"]
    np.testing.assert_array_equal(first.points, again.points)


def _hand_stats(**over) -> RegionStats:
    """Eight regions in two tight groups of the embedding (0-3 near (1, 0), 4-7 near (0, 1)).

    H(S) sum 50, 160, 40, 100 | 90, 20, 24, 120 over 100, 400, 50, 200 | 300, 100, 25, 400 pixels:
    by sum 1 7 3 4 0 2 6 5; by mean (0.5 0.4 0.8 0.5 | 0.3 0.2 0.96 0.3) 6 2 0 3 1 4 7 5;
    by sum / sqrt(pixels) (5 8 5.66 7.07 | 5.20 2 4.8 6) 1 3 7 2 4 0 6 5.
    Dominant predicted classes 0 0 1 1 | 2 2 0 1.
    """
    pixels = torch.tensor([100, 400, 50, 200, 300, 100, 25, 400])
    entropy_sum = torch.tensor([50.0, 160, 40, 100, 90, 20, 24, 120])
    jitter = torch.tensor([0.0, 0.01, 0.02, 0.03] * 2)
    embedding = torch.stack([torch.cat([1 - jitter[:4], jitter[4:]]), torch.cat([jitter[:4], 1 - jitter[4:]])], dim=1)
    votes = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2, 0, 1]), 3).float() * pixels[:, None]
    fields = dict(embedding=embedding, entropy_sum=entropy_sum, entropy_mean=entropy_sum / pixels,
                  margin_mean=torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.05, 0.6]),
                  maxprob_mean=torch.full((8,), 0.5), bald=entropy_sum / 10, pixels=pixels, class_votes=votes)
    return RegionStats(**{**fields, **over})


def _hand_select(strategy: str, budget: int, **kwargs) -> object:
    return select_regions(strategy, cpu_backend(), kwargs.pop("stats", None) or _hand_stats(), torch.arange(8), budget,
                          **kwargs)


def test_region_scores_sum_mean_and_sqrt() -> None:
    assert _hand_select("entropy", 3).indices.tolist() == [1, 7, 3]
    assert _hand_select("entropy", 3, region_score="mean").indices.tolist() == [6, 2, 0]
    sqrt = _hand_select("entropy", 3, region_score="sqrt")
    assert sqrt.indices.tolist() == [1, 3, 7]
    np.testing.assert_allclose(sqrt.scores, [8.0, 100 / np.sqrt(200), 6.0], rtol=1e-6)
    assert _hand_select("bald", 3, region_score="sqrt").indices.tolist() == [1, 3, 7]


def test_a_pixel_budget_cuts_every_strategys_ranking_where_the_next_region_would_pass_it() -> None:
    # sum: 1 (400 px) fits 700, 7 (400 more) would not: region 1 alone.
    assert _hand_select("entropy", 3, budget_pixels=700).indices.tolist() == [1]
    # mean: 6, 2, 0, 3 are 25 + 50 + 100 + 200 = 375 px; region 1 would make 775.
    assert _hand_select("entropy", 3, region_score="mean", budget_pixels=700).indices.tolist() == [6, 2, 0, 3]
    # margin (-(p1 - p2)): 6 0.05, 1 0.1, 3 0.2, 4 0.3: 25 + 400 + 200 = 625 px, then 300 more.
    assert _hand_select("margin", 3, budget_pixels=700).indices.tolist() == [6, 1, 3]
    # random: the same seeded permutation as a region budget, cut where it passes the budget.
    everything = _hand_select("random", 8, seed=5).indices.tolist()
    cut = _hand_select("random", 2, seed=5, budget_pixels=700).indices.tolist()
    spent = np.cumsum(_hand_stats().pixels.numpy()[everything])
    assert cut == everything[: int(np.searchsorted(spent, 700, side="right"))]
    # coreset: greedy for as many picks as could fit (the 3 smallest make 175 px <= 200), then the cut.
    points = torch.tensor([[0.0, 0], [1, 0], [5, 0], [0, 3], [9, 9], [9, 9], [9, 9], [9, 9]])
    stats = _hand_stats(embedding=points, pixels=torch.tensor([10, 10, 30, 10, 500, 500, 500, 500]))
    far = select_regions("coreset", cpu_backend(), stats, torch.arange(4), 2, budget_pixels=35)
    assert far.indices.tolist() == [0]  # greedy 0, 2, 3: 10 px, then 40 > 35
    assert select_regions("coreset", cpu_backend(), stats, torch.arange(4), 2, budget_pixels=50).indices.tolist() == [0, 2, 3]


def test_several_regions_per_cluster_in_turns() -> None:
    """k = 0.5 x 4 = 2 clusters (the two groups), two regions each: 1, 3 of the first, 7, 4 of the second."""
    kmeans = KMeansConfig(n_init=1, random_state=0)
    two = _hand_select("kmeans-entropy", 4, kmeans_cfg=kmeans, clusters_per_budget=0.5)
    assert two.indices.tolist() == [1, 7, 3, 4]
    np.testing.assert_array_equal(two.scores, [160.0, 120.0, 100.0, 90.0])
    # With a pixel budget: turn one 1 and 7 (800 px), turn two 3 (1000 px); 4 would pass 1000.
    capped = _hand_select("kmeans-entropy", 4, kmeans_cfg=kmeans, clusters_per_budget=0.5, budget_pixels=1000)
    assert capped.indices.tolist() == [1, 7, 3]
    from gpual.acquisition.strategies import clusters_for

    assert clusters_for(1600) == (1600, 1) and clusters_for(10, 0.5) == (5, 2) and clusters_for(10, 0.3) == (3, 4)
    assert clusters_for(3, 0.01) == (1, 3)
    with pytest.raises(ValueError, match="clusters_per_budget"):
        clusters_for(10, 1.5)


def test_class_balance_weights_scores_by_the_rarity_of_the_predicted_class() -> None:
    """Labelled pixels 600 / 300 / 100 per class: weights exp(-0.6), exp(-0.3), exp(-0.1) on
    predicted classes 0 0 1 1 | 2 2 0 1: 160 -> 87.8, 120 -> 88.9, 90 -> 81.4, 100 -> 74.1."""
    class_pixels = torch.tensor([600.0, 300.0, 100.0])
    balanced = _hand_select("entropy", 3, class_balance=1.0, class_pixels=class_pixels)
    assert balanced.indices.tolist() == [7, 1, 4]
    np.testing.assert_allclose(balanced.scores, [120 * np.exp(-0.3), 160 * np.exp(-0.6), 90 * np.exp(-0.1)], rtol=1e-6)
    assert _hand_select("entropy", 3, class_balance=0.0, class_pixels=class_pixels).indices.tolist() == [1, 7, 3]
    # margin is weighted as 1 - (p1 - p2): 6 0.95 w.55, 1 0.9 w.55, 3 0.8 w.74, 4 0.7 w.90, 2 0.5 w.74 -> 4, 3, 6.
    assert _hand_select("margin", 3, class_balance=1.0, class_pixels=class_pixels).indices.tolist() == [4, 3, 6]
    # Strategies without an uncertainty never read it, votes or not.
    no_votes = _hand_stats(class_votes=None)
    assert _hand_select("random", 3, seed=1, stats=no_votes, class_balance=1.0).indices.tolist() == \
        _hand_select("random", 3, seed=1).indices.tolist()
    with pytest.raises(GpualError, match="no class votes"):
        _hand_select("entropy", 3, stats=no_votes, class_balance=1.0, class_pixels=class_pixels)
    with pytest.raises(GpualError, match="no labelled pixels per class"):
        _hand_select("entropy", 3, class_balance=1.0)
    with pytest.raises(ValueError, match="predicts 3 classes"):
        _hand_select("entropy", 3, class_balance=1.0, class_pixels=torch.ones(4))


def test_labeled_class_pixels_and_pixel_budget_helpers() -> None:
    import pandas as pd

    from gpual.acquisition.strategies import labeled_class_pixels, pixel_budget

    labeled = pd.DataFrame({"class": [0, 2, 2, 255, 1, 7], "labeled_pixels": [10, 5, 6, 0, 3, 4]})
    assert labeled_class_pixels(labeled, 3).tolist() == [10.0, 3.0, 11.0]  # void and unknown classes count nowhere
    assert labeled_class_pixels(labeled.iloc[:0], 2).tolist() == [0.0, 0.0]
    assert pixel_budget(0.01, 31_708_800) == 317_088 and pixel_budget(0.5, 3) == 2 and pixel_budget(1e-9, 10) == 1
    with pytest.raises(ValueError, match="share"):
        pixel_budget(0.0, 100)


def test_settings_unread_name_the_new_acquisition_keys() -> None:
    from gpual.acquisition.strategies import settings_unread

    assert settings_unread("umap-kmeans-entropy") == ()
    assert settings_unread("entropy") == ("umap", "kmeans", "acquisition.clusters_per_budget")
    assert settings_unread("coreset") == ("umap", "kmeans", "acquisition.region_score", "acquisition.class_balance",
                                          "acquisition.clusters_per_budget")


def test_the_registry_is_the_config_list_in_its_order() -> None:
    from gpual import config
    from gpual.acquisition.strategies import STRATEGIES_BY_NAME

    assert list(STRATEGIES_BY_NAME) == list(config.STRATEGIES)
    assert STRATEGY_NAMES is config.STRATEGIES
    assert all(spec.name == name for name, spec in STRATEGIES_BY_NAME.items())


def test_settings_unread_of_every_strategy_and_of_an_unknown_name() -> None:
    from gpual.acquisition.strategies import settings_unread

    every = ("umap", "kmeans", "acquisition.region_score", "acquisition.class_balance", "acquisition.clusters_per_budget")
    unread_by_strategy = {
        "umap-kmeans-entropy": (),
        "kmeans-entropy": ("umap",),
        "entropy": ("umap", "kmeans", "acquisition.clusters_per_budget"),
        "margin": ("umap", "kmeans", "acquisition.region_score", "acquisition.clusters_per_budget"),
        "least-confidence": ("umap", "kmeans", "acquisition.region_score", "acquisition.clusters_per_budget"),
        "bald": ("umap", "kmeans", "acquisition.clusters_per_budget"),
        "coreset": every,
        "random": every,
    }
    assert list(unread_by_strategy) == list(STRATEGY_NAMES)
    assert {name: settings_unread(name) for name in STRATEGY_NAMES} == unread_by_strategy
    assert settings_unread("best") == every  # gpual.config refuses the name; nothing here reads a setting for it


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_each_declared_need_is_required_and_nothing_else(pool: Pool, strategy: str) -> None:
    """No MC-dropout stats, no memory bank, no class votes: each refused exactly where the
    strategy's definition declares the need, ignored everywhere else."""
    from gpual.acquisition.strategies import STRATEGIES_BY_NAME

    spec = STRATEGIES_BY_NAME[strategy]
    no_bald = RegionStats(**{**pool.stats.__dict__, "bald": None})
    no_votes = RegionStats(**{**pool.stats.__dict__, "class_votes": None})
    # Tiny UMAP (umap-kmeans-entropy runs it twice here): 40 candidates.
    small = dict(candidates=pool.candidates[:40], budget=3)
    lacks = [
        (spec.needs_mc_dropout, "needs Monte-Carlo dropout", dict(stats=no_bald)),
        (spec.needs_bank, "needs the memory bank", dict(bank_vectors=None)),
        (spec.class_balanced, "no class votes",
         dict(stats=no_votes, class_balance=1.0, class_pixels=torch.ones(N_CLASSES))),
    ]
    for needed, message, over in lacks:
        args = dict(stats=pool.stats, bank_vectors=pool.bank, labeled_embedding=pool.labeled_embedding, **small)
        args.update(over)
        call = (strategy, cpu_backend(), args.pop("stats"), args.pop("candidates"), args.pop("budget"))
        if needed:
            with pytest.raises(GpualError, match=message):
                select_regions(*call, **args)
        else:
            assert select_regions(*call, **args).indices.shape == (3,)


def test_a_strategy_definition_refuses_needs_that_contradict() -> None:
    from gpual.acquisition.strategies import ENTROPY, Strategy, _rank_clusters, _rank_random

    with pytest.raises(ValueError, match="weights a score"):
        Strategy("weighted-random", _rank_random, class_balanced=True, needs_permutation=True)
    with pytest.raises(ValueError, match="pooled embeddings"):
        Strategy("blind-kmeans", _rank_clusters, ENTROPY, needs_kmeans=True)


def test_long_stages_are_announced_before_they_run(pool: Pool) -> None:
    """A log shows what a long select is doing: one line before UMAP, KMeans and the
    coreset greedy, and the selection is the silent one's."""
    lines: list[str] = []
    announced = pool.select("umap-kmeans-entropy", announce=lines.append)
    m, n_bank = len(pool.candidates), len(pool.bank)
    assert lines == [f"UMAP: fit on {n_bank:,} memory-bank vectors, transform {m:,} candidate regions",
                     f"KMeans: {BUDGET:,} clusters of {m:,} regions"]
    np.testing.assert_array_equal(announced.indices, pool.select("umap-kmeans-entropy").indices)
    lines.clear()
    pool.select("coreset", announce=lines.append)
    assert lines == [f"coreset: k-center greedy, {BUDGET:,} picks of {m:,} regions"]
    lines.clear()
    pool.select("entropy", announce=lines.append)
    assert lines == []  # a top-k is quick: nothing to announce
