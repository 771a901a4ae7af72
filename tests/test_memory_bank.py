"""Memory bank: FIFO order and capacity, class means, the push rule (correct + highest entropy)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpual.errors import GpualError
from gpual.memory_bank import MemoryBank, push_candidates


def _v(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_fifo_keeps_the_newest_capacity_vectors_oldest_first() -> None:
    bank = MemoryBank(num_classes=2, capacity=3, dim=2, device="cpu")
    bank.push(0, _v([1, 0], [2, 0]))
    assert bank.filled().tolist() == [2, 0]
    assert torch.equal(bank.queue(0), _v([1, 0], [2, 0]))
    bank.push(0, _v([3, 0], [4, 0]))  # wraps: [1,0] is the oldest and is dropped
    assert bank.filled().tolist() == [3, 0]
    assert torch.equal(bank.queue(0), _v([2, 0], [3, 0], [4, 0]))
    bank.push(0, _v([5, 0]))
    assert torch.equal(bank.queue(0), _v([3, 0], [4, 0], [5, 0]))
    bank.push(1, _v([0, 1], [0, 2], [0, 3], [0, 4], [0, 5]))  # more than capacity at once: the last 3
    assert torch.equal(bank.queue(1), _v([0, 3], [0, 4], [0, 5]))
    vectors, ids = bank.vectors()
    assert torch.equal(vectors, _v([3, 0], [4, 0], [5, 0], [0, 3], [0, 4], [0, 5]))
    assert ids.tolist() == [0, 0, 0, 1, 1, 1]


def test_class_means_zero_for_empty_classes() -> None:
    bank = MemoryBank(num_classes=3, capacity=4, dim=2, device="cpu")
    bank.push(0, _v([1, 0], [0, 1]))
    bank.push(2, _v([1, 1], [3, 1], [2, 4]))
    means = bank.class_means()
    assert torch.allclose(means, _v([0.5, 0.5], [0, 0], [2, 2]))
    assert (bank.filled() > 0).tolist() == [True, False, True]
    bank.push(0, _v([1, 0], [1, 0], [1, 0]))  # full and wrapped: mean of the 4 kept
    assert torch.allclose(bank.class_means()[0], torch.tensor([0.75, 0.25]))


def test_push_rule_correct_highest_entropy_per_image_and_class() -> None:
    # 2 images of 1x4 pixels, 2 classes. Probabilities of class 0 per pixel -> entropy in bits.
    p0 = torch.tensor([[0.9, 0.6, 0.3, 0.55], [0.8, 0.7, 0.1, 0.5]])
    probs = torch.stack([p0, 1 - p0], dim=1).view(2, 2, 1, 4)
    labels = torch.tensor([[0, 0, 0, 255], [0, 0, 1, 1]]).view(2, 1, 4)
    # Image 0: pixels 0 (H(0.9)) and 1 (H(0.6)) are correct class 0; pixel 2 is misclassified,
    # pixel 3 unlabeled. Image 1: pixels 0, 1 correct class 0, pixel 2 correct class 1,
    # pixel 3 is a 0.5/0.5 tie: argmax picks class 0, so label 1 is misclassified.
    embedding = F.normalize(torch.randn(2, 3, 1, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    index, cls = push_candidates(probs, labels, per_image=1)
    # Class 0: image 0's best is pixel 1 (H(0.6) > H(0.9)), image 1's is pixel 1 (H(0.7) > H(0.8)); class 1: image 1 pixel 2.
    assert index.tolist() == [1, 4 + 1, 4 + 2] and cls.tolist() == [0, 0, 1]
    index, cls = push_candidates(probs, labels, per_image=5)
    assert index.tolist() == [1, 0, 5, 4, 6] and cls.tolist() == [0, 0, 0, 0, 1]

    bank = MemoryBank(num_classes=2, capacity=10, dim=3, device="cpu")
    bank.update_from_batch(embedding, probs, labels, per_image=1)
    flat = embedding.permute(0, 2, 3, 1).reshape(8, 3)
    assert bank.filled().tolist() == [2, 1]
    assert torch.allclose(bank.queue(0), flat[[1, 5]], atol=1e-6)
    assert torch.allclose(bank.queue(1), flat[[6]], atol=1e-6)


def test_entropy_is_in_bits() -> None:
    # H(0.5, 0.5) = 1 bit beats H(0.9, 0.1) = 0.469 bits; both pixels correct (the tie breaks to class 0).
    probs = torch.tensor([[0.9, 0.5], [0.1, 0.5]]).view(1, 2, 1, 2)
    index, _ = push_candidates(probs, torch.zeros(1, 1, 2, dtype=torch.long), per_image=1)
    assert index.tolist() == [1]
    from gpual.acquisition.pooling import pixel_entropy

    assert pixel_entropy(torch.tensor([0.5, 0.5]), dim=0).item() == pytest.approx(1.0)
    assert pixel_entropy(torch.tensor([0.9, 0.1]), dim=0).item() == pytest.approx(-(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1)))


def test_low_resolution_embedding_is_sampled_like_forward() -> None:
    g = torch.Generator().manual_seed(1)
    low = torch.randn(2, 4, 3, 5, generator=g)
    full = F.normalize(F.interpolate(low, size=(12, 20), mode="bilinear", align_corners=False), dim=1)
    probs = torch.softmax(torch.randn(2, 3, 12, 20, generator=g), dim=1)
    labels = probs.argmax(1)  # everything correct
    labels[:, :4] = 255
    a, b = MemoryBank(3, 50, 4, "cpu"), MemoryBank(3, 50, 4, "cpu")
    a.update_from_batch(low, probs, labels, per_image=4)
    b.update_from_batch(full, probs, labels, per_image=4)
    assert a.filled().tolist() == b.filled().tolist() == [8, 8, 8]
    assert torch.allclose(a.vectors()[0], b.vectors()[0], atol=1e-5)


def test_state_dict_round_trip_and_mismatch() -> None:
    bank = MemoryBank(2, 3, 2, "cpu")
    bank.push(1, _v([1, 2], [3, 4], [5, 6], [7, 8]))
    other = MemoryBank.from_state_dict(bank.state_dict(), "cpu")
    assert torch.equal(other.queue(1), bank.queue(1)) and other.filled().tolist() == [0, 3]
    other.push(1, _v([9, 9]))  # the restored write position continues the FIFO
    assert torch.equal(other.queue(1), _v([5, 6], [7, 8], [9, 9]))
    with pytest.raises(GpualError, match="memory bank"):
        MemoryBank(2, 4, 2, "cpu").load_state_dict(bank.state_dict())
