"""InfoNCE with hand-computed answers, anchor and negative sampling counts and order, cold start."""
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
    assert anchors == 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


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
    anchors = sample_anchors(labels, pred, [0, 1, 2], n_hard=25, n_random=25, generator=_gen())
    per_class = {c: (anchors.label == c) for c in range(4)}
    assert [int(m.sum()) for m in per_class.values()] == [30, 50, 5, 0]
    assert [int((m & anchors.hard).sum()) for m in per_class.values()] == [10, 25, 0, 0]
    assert anchors.index.unique().numel() == anchors.index.numel()  # no pixel twice
    assert torch.equal(labels[anchors.index], anchors.label)
    assert (pred[anchors.index[anchors.hard]] != anchors.label[anchors.hard]).all()  # hard = misclassified
    # Class 0 has fewer pixels than 50: every pixel is used.
    assert set(anchors.index[per_class[0]].tolist()) == set(range(30))


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
