"""Every strategy on small pooled statistics: exact budgets, the right picks, clear errors.

umap-learn compiles with numba on its first fit (tens of seconds), so the paper's strategy
runs once per module (fixture ``umap_selection``) and the other UMAP fits are on tiny data.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gpual.backend import cpu_backend
from gpual import clustering
from gpual.clustering import kmeans_labels, resolve_levels
from gpual.config import KMeansConfig, UmapConfig
from gpual.embedding import umap_embed
from gpual.errors import GpualError
from gpual.pooling import RegionStats
from gpual.ranking import select_per_cluster
from gpual.strategies import STRATEGY_NAMES, kcenter_greedy, select_regions

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

    from gpual.embedding import SPECTRAL_NOTE

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
    with pytest.raises(GpualError, match="budget of 31 regions .* 30 unlabeled candidate regions: lower --budget"):
        kmeans_labels(cpu_backend(), points, 31, KMeansConfig())


@pytest.mark.parametrize("init", ["random", "k-means++"])
def test_kmeans_init_and_tol_reach_the_estimator(init: str) -> None:
    from sklearn.cluster import KMeans

    points = np.random.default_rng(1).normal(size=(200, 2)).astype(np.float32)
    cfg = KMeansConfig(init=init, tol=1e-2, max_iter=50, random_state=3)
    expected = KMeans(n_clusters=7, init=init, tol=1e-2, max_iter=50, n_init=1, random_state=3).fit_predict(points)
    np.testing.assert_array_equal(kmeans_labels(cpu_backend(), points, 7, cfg), expected)


def test_errors(pool: Pool) -> None:
    with pytest.raises(GpualError, match="unknown strategy 'best'") as err:
        pool.select("best")
    assert err.value.exit_code == 2
    m = len(pool.candidates)
    too_big = f"budget of {m + 1} regions is larger than the {m} unlabeled candidate regions: lower --budget"
    with pytest.raises(GpualError, match=too_big):
        pool.select("entropy", budget=m + 1)
    with pytest.raises(GpualError, match="must be positive"):
        pool.select("entropy", budget=0)
    no_bald = RegionStats(**{**pool.stats.__dict__, "bald": None})
    with pytest.raises(GpualError, match="bald needs Monte-Carlo dropout"):
        select_regions("bald", cpu_backend(), no_bald, pool.candidates, BUDGET)
    with pytest.raises(GpualError, match="needs the memory bank"):
        pool.select("umap-kmeans-entropy", bank_vectors=None)
    with pytest.raises(GpualError, match="region score 'max'"):
        pool.select("entropy", region_score="max")


def test_group_shares_sum_to_k_within_bounds() -> None:
    from gpual.clustering import group_shares

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
