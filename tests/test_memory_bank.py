"""Memory bank: FIFO order and capacity, class means, the push rule (correct + highest entropy),
the one-scatter update against the class-by-class pushes it replaces, and no host reads."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpual.acquisition.pooling import pixel_entropy
from gpual.errors import GpualError
from gpual.memory_bank import MemoryBank, push_candidates
from gpual.model import embedding_at


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
    index, cls, valid = push_candidates(probs, labels, per_image=1)
    # A fixed shape: C * B * k slots, class-major, then image.
    assert index.shape == cls.shape == valid.shape == (2 * 2 * 1,) and cls.tolist() == [0, 0, 1, 1]
    # Class 0: image 0's best is pixel 1 (H(0.6) > H(0.9)), image 1's is pixel 1 (H(0.7) > H(0.8)); class 1: image 1 pixel 2.
    assert index[valid].tolist() == [1, 4 + 1, 4 + 2] and cls[valid].tolist() == [0, 0, 1]
    assert valid.tolist() == [True, True, False, True]  # image 0 has no class-1 candidate
    index, cls, valid = push_candidates(probs, labels, per_image=5)
    assert index.shape == (2 * 2 * 4,)  # k = min(5, H * W)
    assert index[valid].tolist() == [1, 0, 5, 4, 6] and cls[valid].tolist() == [0, 0, 0, 0, 1]

    bank = MemoryBank(num_classes=2, capacity=10, dim=3, device="cpu")
    bank.update_from_batch(embedding, probs, labels, per_image=1)
    flat = embedding.permute(0, 2, 3, 1).reshape(8, 3)
    assert bank.filled().tolist() == [2, 1]
    assert torch.allclose(bank.queue(0), flat[[1, 5]], atol=1e-6)
    assert torch.allclose(bank.queue(1), flat[[6]], atol=1e-6)


def test_entropy_is_in_bits() -> None:
    # H(0.5, 0.5) = 1 bit beats H(0.9, 0.1) = 0.469 bits; both pixels correct (the tie breaks to class 0).
    probs = torch.tensor([[0.9, 0.5], [0.1, 0.5]]).view(1, 2, 1, 2)
    index, _, valid = push_candidates(probs, torch.zeros(1, 1, 2, dtype=torch.long), per_image=1)
    assert index[valid].tolist() == [1]
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


def test_a_checkpoint_of_the_host_counter_format_loads() -> None:
    # Before the counters moved to the device, files held them as CPU tensors; they load onto
    # the bank's device (meta here, a device other than the file's) and the FIFO goes on.
    store = torch.zeros(2, 3, 2)
    store[1] = _v([7, 8], [5, 6], [6, 6])  # full, oldest at slot 1
    old = {"num_classes": 2, "capacity": 3, "dim": 2, "store": store, "next": torch.tensor([0, 1]),
           "count": torch.tensor([0, 3])}
    bank = MemoryBank.from_state_dict(old, "cpu")
    assert torch.equal(bank.queue(1), _v([5, 6], [6, 6], [7, 8])) and bank.filled().tolist() == [0, 3]
    bank.push(1, _v([9, 9]))
    assert torch.equal(bank.queue(1), _v([6, 6], [7, 8], [9, 9]))
    meta = MemoryBank.from_state_dict(old, "meta")
    assert meta.counts().device.type == "meta" and meta.state_dict()["next"].device.type == "meta"


def test_counts_and_slots_are_fixed_shape_device_views() -> None:
    bank = MemoryBank(3, 4, 2, "cpu")
    bank.push(0, _v([1, 0], [0, 1]))
    bank.push(2, _v([1, 1], [2, 2], [3, 3], [4, 4], [5, 5]))  # more than capacity: the last 4, from slot 0
    bank.push(2, _v([6, 6]))  # wraps: the oldest, [2, 2] in slot 0, is overwritten
    counts = bank.counts()
    assert counts.tolist() == [2, 0, 4] and counts.device == bank.device
    vectors, ids, valid = bank.slots()
    assert vectors.shape == (12, 2) and ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert valid.tolist() == [True, True, False, False] + [False] * 4 + [True] * 4
    assert torch.equal(vectors[valid], _v([1, 0], [0, 1], [6, 6], [3, 3], [4, 4], [5, 5]))  # slot, not queue, order
    assert torch.equal(bank.queue(2), _v([3, 3], [4, 4], [5, 5], [6, 6]))
    filled = bank.filled()
    bank.push(1, _v([1, 1]))
    assert filled.tolist() == [2, 0, 4] and counts.tolist() == [2, 0, 4]  # copies / snapshots


# --- the one-scatter update against the class-by-class pushes it replaced ----------------


def _reference_push(store: torch.Tensor, next_slot: list[int], count: list[int], cls: int, vectors: torch.Tensor) -> None:
    """The push as it was, one class at a time with host counters (the oracle)."""
    capacity = store.shape[1]
    n = vectors.shape[0]
    if n == 0:
        return
    if n > capacity:
        vectors, n = vectors[n - capacity:], capacity
    slots = (torch.arange(n) + next_slot[cls]) % capacity
    store[cls, slots] = vectors
    next_slot[cls] = (next_slot[cls] + n) % capacity
    count[cls] = min(count[cls] + n, capacity)


def _reference_update(store, next_slot, count, embedding, probs, labels, per_image) -> list[int]:
    """The push rule pixel by pixel: per class, per image, the correct pixels by decreasing
    entropy, the first ``per_image``; then each class's vectors pushed in that order.
    Returns the number pushed per class."""
    b, c, h, w = probs.shape
    sizes = []
    entropy = pixel_entropy(probs).reshape(b, h * w).tolist()
    pred = probs.argmax(1).reshape(b, h * w).tolist()
    flat = labels.reshape(b, h * w).tolist()
    for cls in range(c):
        chosen = []
        for image in range(b):
            pixels = [p for p in range(h * w) if flat[image][p] == cls and pred[image][p] == cls]
            pixels.sort(key=lambda p: -entropy[image][p])
            chosen += [image * h * w + p for p in pixels[:per_image]]
        if chosen:
            _reference_push(store, next_slot, count, cls, embedding_at(embedding, torch.tensor(chosen), (h, w)))
        sizes.append(len(chosen))
    return sizes


@pytest.mark.parametrize("capacity, per_image", [(7, 3), (4, 5), (40, 2)])
def test_update_equals_the_class_by_class_pushes(capacity: int, per_image: int) -> None:
    # Random batches into a small bank: full queues, wrap-around, classes absent from a batch
    # (class 3 is never labelled), and pushes of more than the capacity (B * per_image > 4).
    g = torch.Generator().manual_seed(capacity)
    b, c, h, w, d = 3, 4, 5, 6, 3
    bank = MemoryBank(c, capacity, d, "cpu")
    store, next_slot, count, sizes = torch.zeros(c, capacity, d), [0] * c, [0] * c, []
    for step in range(12):
        embedding = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1)  # full resolution: a plain gather
        probs = torch.softmax(2 * torch.randn(b, c, h, w, generator=g), dim=1)
        labels = torch.where(torch.rand(b, h, w, generator=g) < 0.3, probs.argmax(1), torch.randint(0, 3, (b, h, w), generator=g))
        labels[labels == 3] = 255
        labels[torch.rand(b, h, w, generator=g) < 0.2] = 255
        if step % 4 == 1:
            labels[labels == 1] = 255  # a class missing from the whole batch
        bank.update_from_batch(embedding, probs, labels, per_image)
        sizes += _reference_update(store, next_slot, count, embedding, probs, labels, per_image)
        assert torch.equal(bank._store, store), step
        assert bank._next.tolist() == next_slot and bank.filled().tolist() == count, step
    # The cases above did occur: an empty class, full queues, and (for small banks) a push over capacity.
    assert count[3] == 0 and max(count) == capacity and 0 in sizes and sum(sizes) > 2 * capacity
    assert max(sizes) > capacity or capacity > b * per_image


def test_push_equals_the_reference_push() -> None:
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(3, 5, 2, "cpu")
    store, next_slot, count = torch.zeros(3, 5, 2), [0] * 3, [0] * 3
    for step in range(60):
        cls, n = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(0, 13, (1,), generator=g))
        vectors = torch.randn(n, 2, generator=g)
        bank.push(cls, vectors)
        _reference_push(store, next_slot, count, cls, vectors)
        assert torch.equal(bank._store, store) and bank._next.tolist() == next_slot and bank.filled().tolist() == count, step


def test_update_reads_nothing_on_the_host() -> None:
    # On the meta device every data-dependent op (nonzero, boolean-mask indexing, item,
    # tolist, unique) raises: the push runs there, so it never waits for the device.
    meta = torch.device("meta")
    bank = MemoryBank(4, 7, 3, meta)
    bank.update_from_batch(torch.empty(2, 3, 3, 4, device=meta), torch.empty(2, 4, 6, 8, device=meta),
                           torch.empty(2, 6, 8, dtype=torch.long, device=meta), per_image=3)
    bank.push(1, torch.empty(9, 3, device=meta))
    vectors, ids, valid = bank.slots()
    assert vectors.shape == (28, 3) and bank.counts().device == meta and bank.class_means().shape == (4, 3)
    with pytest.raises((NotImplementedError, RuntimeError)):
        torch.nonzero(valid)  # the check has teeth
