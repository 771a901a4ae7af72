"""InfoNCE with hand-computed answers, anchor and negative sampling counts, order and uniformity,
cold start, and no host reads in the contrastive term."""
from __future__ import annotations

import math

import pytest
import torch

from gpual.config import ContrastiveConfig
from gpual.losses import contrastive_loss, cross_entropy, info_nce, sample_anchors, sample_negatives
from gpual.memory_bank import MemoryBank


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_info_nce_three_anchors_by_hand() -> None:
    positive = torch.tensor([1.0, 0.5, 0.0])
    negatives = torch.tensor([[0.0, 0.0], [0.5, 0.9], [1.0, 0.0]])
    valid = torch.tensor([[True, True], [True, False], [True, True]])  # anchor 1's second negative is padding
    tau = 0.5
    # -log(e^{s+/t} / (e^{s+/t} + sum e^{s-/t})), by hand:
    expected = (
        math.log(1 + 2 * math.exp(-2))  # anchor 0: e^2 / (e^2 + 1 + 1)
        + math.log(2)  # anchor 1: e^1 / (e^1 + e^1)
        + math.log(2 + math.exp(2))  # anchor 2: 1 / (1 + e^2 + 1)
    ) / 3
    assert info_nce(positive, negatives, valid, tau).item() == pytest.approx(expected, rel=1e-6)
    assert info_nce(positive[:0], negatives[:0], valid[:0], tau).item() == 0.0


def test_contrastive_loss_end_to_end_by_hand() -> None:
    # Three labeled pixels, one per class, unit vectors in 2-D; the bank holds one vector per class.
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]).T.reshape(1, 2, 1, 3).requires_grad_(True)
    labels = torch.tensor([[[0, 1, 2]]])
    logits = torch.zeros(1, 3, 1, 3)
    bank = MemoryBank(3, 10, 2, "cpu")
    for c, v in enumerate(([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0])):
        bank.push(c, torch.tensor([v]))
    cfg = ContrastiveConfig(temperature=0.1)
    loss, anchors = contrastive_loss(emb, logits, labels, bank, cfg, _gen())
    # sims to (positive; negatives): pixel 0: 1; 0, -1. pixel 1: 0.8; 0.6, -0.6. pixel 2: 0; 0, 1.
    expected = (
        -math.log(math.exp(10) / (math.exp(10) + 1 + math.exp(-10)))
        - math.log(math.exp(8) / (math.exp(8) + math.exp(6) + math.exp(-6)))
        - math.log(1 / (1 + 1 + math.exp(10)))
    ) / 3
    assert anchors.ndim == 0 and anchors == 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def _eligible(*classes: bool) -> torch.Tensor:
    return torch.tensor(classes)


def _valid_per_class(anchors, c: int) -> tuple[list[int], list[int]]:
    """(valid anchors, valid hard anchors) per class."""
    per_class = [(anchors.label == k) & anchors.valid for k in range(c)]
    return [int(m.sum()) for m in per_class], [int((m & anchors.hard).sum()) for m in per_class]


def test_anchor_counts_and_hardness() -> None:
    n = 200
    labels = torch.full((n,), 255)
    pred = torch.zeros(n, dtype=torch.long)
    labels[0:30] = 0
    pred[0:10] = 1  # class 0: 30 pixels, 10 misclassified
    labels[30:130] = 1
    pred[30:130] = 1
    pred[30:70] = 2  # class 1: 100 pixels, 40 misclassified
    labels[130:135] = 2
    pred[130:135] = 2  # class 2: 5 pixels, all correct
    labels[135:160] = 3  # class 3 has no positive in the bank: not eligible
    anchors = sample_anchors(labels, pred, _eligible(True, True, True, False), n_hard=25, n_random=25, generator=_gen())
    # A fixed shape: 4 classes x (25 + 25) slots, class-major, hard slots first.
    assert anchors.index.shape == anchors.label.shape == anchors.hard.shape == anchors.valid.shape == (200,)
    assert anchors.label.tolist() == sum(([k] * 50 for k in range(4)), [])
    assert anchors.hard.tolist() == ([True] * 25 + [False] * 25) * 4
    assert _valid_per_class(anchors, 4) == ([30, 50, 5, 0], [10, 25, 0, 0])
    index, label, hard = anchors.index[anchors.valid], anchors.label[anchors.valid], anchors.hard[anchors.valid]
    assert index.unique().numel() == index.numel()  # no pixel twice
    assert torch.equal(labels[index], label)
    assert (pred[index[hard]] != label[hard]).all()  # hard = misclassified
    # Class 0 has fewer pixels than 50: every pixel is used.
    assert set(index[label == 0].tolist()) == set(range(30))


def test_anchor_counts_on_random_batches() -> None:
    # Exactly min(n_hard, misclassified) hard and min(n_random, rest) random anchors per eligible class.
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        n, c = 400, 6
        labels = torch.randint(0, c + 2, (n,), generator=g)
        labels[labels >= c] = 255
        pred = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(0, c, (n,), generator=g), labels)
        eligible = torch.rand(c, generator=g) < 0.7
        n_hard, n_random = int(torch.randint(0, 12, (1,), generator=g)), int(torch.randint(0, 40, (1,), generator=g))
        anchors = sample_anchors(labels, pred, eligible, n_hard, n_random, _gen(trial))
        wrong = [int(((labels == k) & (pred != k)).sum()) for k in range(c)]
        pixels = [int((labels == k).sum()) for k in range(c)]
        hard = [min(n_hard, wrong[k]) if eligible[k] else 0 for k in range(c)]
        rest = [min(n_random, pixels[k] - hard[k]) if eligible[k] else 0 for k in range(c)]
        assert _valid_per_class(anchors, c) == ([h + r for h, r in zip(hard, rest)], hard), trial
        index = anchors.index[anchors.valid]
        assert index.unique().numel() == index.numel() and torch.equal(labels[index], anchors.label[anchors.valid])
        assert (pred[anchors.index[anchors.valid & anchors.hard]] != anchors.label[anchors.valid & anchors.hard]).all()


def test_anchors_are_deterministic_for_a_seed_and_uniform() -> None:
    n = 60
    labels = torch.zeros(n, dtype=torch.long)
    pred = torch.zeros(n, dtype=torch.long)
    pred[:20] = 1  # 20 misclassified, 40 correct pixels of class 0
    eligible = _eligible(True, True)
    a, b = (sample_anchors(labels, pred, eligible, 5, 10, _gen(7)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip((a.index, a.valid), (b.index, b.valid)))
    assert not torch.equal(a.index, sample_anchors(labels, pred, eligible, 5, 10, _gen(8)).index)
    # Over many draws: each misclassified pixel is hard 5/20 of the time; each pixel is a random
    # anchor 10 / 55 of the draws (the rest after 5 hard ones: 15 wrong + 40 correct).
    draws, g = 2000, _gen(9)
    hard_hits, rest_hits = torch.zeros(n), torch.zeros(n)
    for _ in range(draws):
        anchors = sample_anchors(labels, pred, eligible, 5, 10, g)
        valid = anchors.valid
        hard_hits += torch.bincount(anchors.index[valid & anchors.hard], minlength=n)
        rest_hits += torch.bincount(anchors.index[valid & ~anchors.hard], minlength=n)
    assert (hard_hits[20:] == 0).all()
    assert ((hard_hits[:20] / draws - 5 / 20).abs() < 0.04).all()
    # A wrong pixel is random only when it was not drawn hard: (15/20) * (10/55).
    assert ((rest_hits[:20] / draws - 0.75 * 10 / 55).abs() < 0.04).all()
    assert ((rest_hits[20:] / draws - 10 / 55).abs() < 0.04).all()


def test_negatives_hardest_first_then_random_from_the_rest() -> None:
    bank_label = torch.tensor([0, 1, 1, 2, 2, 0, 1])
    similarity = torch.tensor([
        [0.9, 0.1, 0.5, 0.3, -0.2, 0.8, 0.4],  # anchor of class 0: negatives 1, 2, 3, 4, 6
        [0.2, 0.7, -0.1, 0.95, 0.6, 0.3, 0.0],  # anchor of class 2: negatives 0, 1, 2, 5, 6
    ])
    anchor_label = torch.tensor([0, 2])
    index, valid = sample_negatives(similarity, anchor_label, bank_label, n_hard=2, n_random=2, generator=_gen())
    assert index.shape == (2, 4) and valid.all()
    assert index[:, :2].tolist() == [[2, 6], [1, 5]]  # decreasing similarity, own class (0.9, 0.95) excluded
    assert set(index[0, 2:].tolist()) <= {1, 3, 4} and set(index[1, 2:].tolist()) <= {0, 2, 6}
    assert all(len(set(row)) == 4 for row in index.tolist())
    # Fewer negatives than asked: 5 other-class vectors for 3 hard + 3 random slots.
    index, valid = sample_negatives(similarity, anchor_label, bank_label, n_hard=3, n_random=3, generator=_gen())
    assert valid.sum(1).tolist() == [5, 5]
    assert index[0, :3].tolist() == [2, 6, 3]
    assert set(index[0][valid[0]].tolist()) == {1, 2, 3, 4, 6}


def test_random_negatives_are_uniform() -> None:
    a = 4000
    bank_label = torch.tensor([1, 1, 1, 1, 1, 0])
    similarity = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.4, 1.0]).expand(a, 6)
    index, valid = sample_negatives(similarity, torch.zeros(a, dtype=torch.long), bank_label, n_hard=1, n_random=1,
                                    generator=_gen(3))
    assert (index[:, 0] == 0).all() and valid.all()
    counts = torch.bincount(index[:, 1], minlength=6)
    assert counts[0] == 0 and counts[5] == 0
    assert ((counts[1:5].float() / a - 0.25).abs() < 0.03).all()


def test_empty_bank_slots_are_never_negatives() -> None:
    bank_label = torch.tensor([0, 0, 1, 1, 2, 2])
    bank_valid = torch.tensor([True, False, True, False, True, False])
    similarity = torch.tensor([0.1, 0.9, 0.2, 0.95, 0.3, 0.99]).expand(500, 6)
    index, valid = sample_negatives(similarity, torch.zeros(500, dtype=torch.long), bank_label, n_hard=1, n_random=2,
                                    generator=_gen(), bank_valid=bank_valid)
    assert (index[:, 0] == 4).all() and valid[:, 0].all()  # the hardest valid other-class slot
    assert (index[:, 1] == 2).all() and valid[:, 1].all() and not valid[:, 2].any()  # the only one left


def test_invalid_anchors_count_for_nothing_and_keep_gradients_finite() -> None:
    positive = torch.tensor([0.5, 0.2, 0.9], requires_grad=True)
    negatives = torch.tensor([[0.1, 0.3], [0.0, 0.0], [0.4, 0.2]], requires_grad=True)
    valid = torch.tensor([[True, True], [False, False], [True, False]])  # anchor 1 has no negative at all
    anchor_valid = torch.tensor([True, False, True])
    loss = info_nce(positive, negatives, valid, 0.5, anchor_valid)
    kept = torch.tensor([0, 2])
    assert loss.item() == pytest.approx(info_nce(positive[kept], negatives[kept], valid[kept], 0.5).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(positive.grad).all() and torch.isfinite(negatives.grad).all()
    assert positive.grad[1] == 0 and (negatives.grad[1] == 0).all()
    none = info_nce(positive, negatives, valid, 0.5, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad


def test_contrastive_term_reads_nothing_on_the_host() -> None:
    # On the meta device nonzero, boolean-mask indexing, item and tolist raise: the anchor
    # sampling, the negatives and the loss (and its backward) run there.
    meta = torch.device("meta")
    bank = MemoryBank(4, 7, 3, meta)
    labels = torch.empty(2, 6, 8, dtype=torch.long, device=meta)
    emb = torch.empty(2, 3, 3, 4, device=meta, requires_grad=True)
    loss, anchors = contrastive_loss(emb, torch.empty(2, 4, 6, 8, device=meta), labels, bank, ContrastiveConfig(), _gen())
    loss.backward()
    assert loss.shape == anchors.shape == () and anchors.dtype == torch.int64 and emb.grad.shape == emb.shape
    ce = cross_entropy(torch.empty(2, 4, 6, 8, device=meta), labels)
    assert ce.shape == () and ce.device == meta


def test_cold_start_contrastive_term_off() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(1, 4, 6, 6, generator=g), dim=1).requires_grad_(True)
    labels = torch.randint(0, 3, (1, 6, 6), generator=g)
    logits = torch.randn(1, 3, 6, 6, generator=g)
    bank = MemoryBank(3, 20, 4, "cpu")
    cfg = ContrastiveConfig()
    loss, anchors = contrastive_loss(emb, logits, labels, bank, cfg, _gen())
    assert anchors == 0 and loss.item() == 0.0
    loss.backward()  # a zero term that still has a graph
    bank.push(1, torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1))
    loss, anchors = contrastive_loss(emb, logits, labels, bank, cfg, _gen())
    assert anchors == 0 and loss.item() == 0.0  # a positive but no negative anywhere
    bank.push(2, torch.nn.functional.normalize(torch.randn(5, 4, generator=g), dim=1))
    loss, anchors = contrastive_loss(emb, logits, labels, bank, cfg, _gen())
    # Class 0 has no queue: only classes 1 and 2 give anchors (all their pixels: fewer than 50 each).
    assert anchors == int(((labels == 1) | (labels == 2)).sum()) and loss.item() > 0


def test_cross_entropy_ignores_unlabeled_and_never_nan() -> None:
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    labels = torch.tensor([[[0, 255]]])
    assert cross_entropy(logits, labels).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))
    assert cross_entropy(logits, torch.full_like(labels, 255)).item() == 0.0
    graph = logits.clone().requires_grad_(True)
    zero = cross_entropy(graph, torch.full_like(labels, 255))
    zero.backward()  # exactly 0, with a graph and a zero gradient
    assert zero.item() == 0.0 and (graph.grad == 0).all()
