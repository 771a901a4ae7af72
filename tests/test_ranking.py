"""cluster_argmax, select_per_cluster and top_k against naive loops (ties, empty clusters)."""
from __future__ import annotations

import numpy as np
import pytest

from gpual.acquisition.ranking import cluster_argmax, select_per_cluster, stable_argsort, top_k


def _naive_argmax(scores: np.ndarray, clusters: np.ndarray, k: int) -> np.ndarray:
    best = np.full(k, -1, dtype=np.int64)
    for i, (s, c) in enumerate(zip(scores, clusters)):
        if best[c] == -1 or s > scores[best[c]]:  # strict: the first (lowest) index wins ties
            best[c] = i
    return best


def _order(scores: np.ndarray, idx) -> list[int]:
    """Descending score, ties by lowest index."""
    return sorted(idx, key=lambda i: (-scores[i], i))


def _naive_select(scores: np.ndarray, clusters: np.ndarray, k: int, budget: int) -> list[int]:
    winners = [int(i) for i in _naive_argmax(scores, clusters, k) if i >= 0]
    picked = _order(scores, winners)[:budget]
    rest = [i for i in _order(scores, range(len(scores))) if i not in picked]
    return _order(scores, picked + rest[: budget - len(picked)])


def _random_case(rng: np.random.Generator, n: int, k: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    # Few score levels -> many ties; clusters drawn from a subset -> empty clusters.
    scores = rng.integers(0, levels, n).astype(np.float32) / levels
    used = rng.choice(k, size=max(1, k // 2), replace=False)
    return scores, rng.choice(used, size=n).astype(np.int64)


@pytest.mark.parametrize("seed", range(6))
def test_cluster_argmax_equals_naive_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 200)), int(rng.integers(1, 30))
    scores, clusters = _random_case(rng, n, k, levels=int(rng.integers(2, 6)))
    got = cluster_argmax(scores, clusters, k)
    assert got.dtype == np.int64 and got.shape == (k,)
    np.testing.assert_array_equal(got, _naive_argmax(scores, clusters, k))


def test_cluster_argmax_hand_case() -> None:
    scores = np.array([0.2, 0.9, 0.9, 0.1, 0.5, 0.5], dtype=np.float32)
    clusters = np.array([0, 0, 0, 3, 3, 1])
    # cluster 0: tie 1/2 -> 1; cluster 1: 5; cluster 2: empty; cluster 3: 4.
    np.testing.assert_array_equal(cluster_argmax(scores, clusters, 4), [1, 5, -1, 4])
    np.testing.assert_array_equal(cluster_argmax(scores[:0], clusters[:0], 2), [-1, -1])


@pytest.mark.parametrize("seed", range(6))
def test_select_per_cluster_equals_naive_with_top_up(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 150))
    k = int(rng.integers(2, min(n, 25) + 1))
    scores, clusters = _random_case(rng, n, k, levels=4)
    got = select_per_cluster(scores, clusters, k, k)
    assert got.dtype == np.int64 and got.shape == (k,)
    assert len(set(got.tolist())) == k
    winners = {int(i) for i in _naive_argmax(scores, clusters, k) if i >= 0}
    assert winners <= set(got.tolist())  # empty clusters exist: the rest is top-up
    assert len(winners) < k
    assert got.tolist() == _naive_select(scores, clusters, k, k)


def test_select_per_cluster_hand_case() -> None:
    scores = np.array([1.0, 3.0, 3.0, 2.0, 5.0, 5.0, 0.0], dtype=np.float32)
    clusters = np.array([0, 0, 0, 2, 2, 2, 3])
    # winners: cluster 0 -> 1, cluster 2 -> 4, cluster 3 -> 6; cluster 1 empty -> top-up with 5.
    assert select_per_cluster(scores, clusters, 4, 4).tolist() == [4, 5, 1, 6]
    # budget below the winners' count keeps the best winners.
    assert select_per_cluster(scores, clusters, 4, 2).tolist() == [4, 1]
    # budget above k tops up further.
    assert select_per_cluster(scores, clusters, 4, 6).tolist() == [4, 5, 1, 2, 3, 6]


def test_select_per_cluster_budget_bounds() -> None:
    scores = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="budget of 4 regions .* 3 candidate"):
        select_per_cluster(scores, np.zeros(3, dtype=np.int64), 1, 4)


def test_top_k_ties_lowest_index_first() -> None:
    scores = np.array([1.0, 2.0, 2.0, 0.5, 2.0, 3.0], dtype=np.float32)
    assert top_k(scores, 3).tolist() == [5, 1, 2]
    assert top_k(scores, 6).tolist() == [5, 1, 2, 4, 0, 3]
    assert top_k(scores, 0).tolist() == []
    rng = np.random.default_rng(7)
    many = rng.integers(0, 3, 500).astype(np.float32)
    assert top_k(many, 200).tolist() == _order(many, range(500))[:200]
    with pytest.raises(ValueError, match="7 regions .* 6 candidate"):
        top_k(scores, 7)


def test_stable_argsort_descending_keeps_index_order() -> None:
    x = np.array([2, 1, 2, 1, 2], dtype=np.int64)
    assert stable_argsort(x).tolist() == [1, 3, 0, 2, 4]
    assert stable_argsort(x, descending=True).tolist() == [0, 2, 4, 1, 3]


def test_rank_in_cluster_and_priority_in_turns() -> None:
    from gpual.acquisition.ranking import cluster_priority, rank_in_cluster

    scores = np.array([0.2, 0.9, 0.9, 0.1, 0.5, 0.5, 0.3], dtype=np.float32)
    clusters = np.array([0, 0, 0, 3, 3, 1, 0])
    # cluster 0: 1, 2 (tie: lower index first), 6, 0; cluster 3: 4, 3; cluster 1: 5.
    assert rank_in_cluster(scores, clusters).tolist() == [3, 0, 1, 1, 0, 0, 2]
    # depth 1: winners 1, 4, 5 by score (4 before 5: tie), then the rest by score: 2, 6, 0, 3.
    assert cluster_priority(scores, clusters).tolist() == [1, 4, 5, 2, 6, 0, 3]
    # depth 2: the winners, then the second bests 2, 3 (cluster 1 has none), then 6, 0.
    assert cluster_priority(scores, clusters, depth=2).tolist() == [1, 4, 5, 2, 3, 6, 0]
    assert cluster_priority(scores, clusters, depth=9).tolist() == [1, 4, 5, 2, 3, 6, 0]
    # select_per_cluster takes the first `budget` of that order, best score first.
    assert select_per_cluster(scores, clusters, 4, 5, depth=2).tolist() == [1, 2, 4, 5, 3]
    assert select_per_cluster(scores, clusters, 4, 5).tolist() == [1, 2, 4, 5, 6]
    with pytest.raises(ValueError, match="depth = 0"):
        cluster_priority(scores, clusters, depth=0)


def test_within_pixels_takes_the_ranked_prefix_that_fits() -> None:
    from gpual.acquisition.ranking import most_within_pixels, within_pixels

    pixels = np.array([100, 400, 50, 200, 300], dtype=np.int64)
    order = np.array([1, 3, 0, 2, 4], dtype=np.int64)  # 400, 600, 700, 750, 1050 pixels
    assert within_pixels(order, pixels, 700).tolist() == [1, 3, 0]  # exactly the budget
    assert within_pixels(order, pixels, 749).tolist() == [1, 3, 0]  # region 2 would pass it: stop, never skip
    assert within_pixels(order, pixels, 10_000).tolist() == [1, 3, 0, 2, 4]
    assert within_pixels(order, pixels, 399).tolist() == [1]  # the first region always
    assert within_pixels(order[:0], pixels, 5).tolist() == []
    assert most_within_pixels(pixels, 360) == 3  # 50 + 100 + 200
    assert most_within_pixels(pixels, 10) == 1 and most_within_pixels(pixels, 10_000) == 5
    with pytest.raises(ValueError, match="must be positive"):
        within_pixels(order, pixels, 0)


def test_class_balance_weights_are_exp_of_minus_the_labelled_share() -> None:
    from gpual.acquisition.ranking import class_balance_weights, class_balanced

    predicted = np.array([0, 1, 2, 0])
    class_pixels = np.array([600.0, 300.0, 100.0])  # shares 0.6, 0.3, 0.1
    want = np.exp(-np.array([0.6, 0.3, 0.1, 0.6])).astype(np.float32)
    got = class_balance_weights(predicted, class_pixels, 1.0)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    twice = np.exp(-2.0 * np.array([0.6, 0.3, 0.1, 0.6])).astype(np.float32)
    np.testing.assert_array_equal(class_balance_weights(predicted, class_pixels, 2.0), twice)
    assert class_balance_weights(predicted, class_pixels, 0.0).tolist() == [1.0] * 4  # off
    assert class_balance_weights(predicted, np.zeros(3), 1.0).tolist() == [1.0] * 4  # nothing labelled yet
    scores = np.array([10.0, 10.0, 10.0, 1.0], dtype=np.float32)
    np.testing.assert_array_equal(class_balanced(scores, predicted, class_pixels, 1.0), scores * want)
    with pytest.raises(ValueError, match="must not be negative"):
        class_balance_weights(predicted, class_pixels, -1.0)
