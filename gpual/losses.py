"""Training losses: pixel-wise cross-entropy (Eq. 2) and the memory-bank InfoNCE (Eq. 3).

The contrastive term, per batch (paper section 3.2 and 4.2, docs/method.md):

- Anchors: for each class present among the batch's labeled pixels, ``anchors_hard`` (25)
  misclassified pixels drawn uniformly among the class's misclassified ones, and
  ``anchors_random`` (25) further pixels drawn uniformly from the rest of the class (fewer
  when fewer exist).
- Positive: the mean of the anchor's class queue in the memory bank, L2-normalised, so the
  positive logit is a cosine similarity on the same scale as the negatives' (the raw
  mean of unit vectors is shorter than 1 and would cap the positive logit).
- Negatives: from the other classes' queues, the ``negatives_hard`` (512) with the highest
  cosine similarity to the anchor, then ``negatives_random`` (512) drawn uniformly from the
  remaining ones (fewer when the bank holds fewer).
- Cold start: a class whose queue is empty has no positive, and an anchor with no
  negative has nothing to contrast with; such anchors are skipped. With no anchor left
  the term is exactly 0 (the loss is the cross-entropy alone).

All sampling is done on the embeddings' device with an explicit ``torch.Generator``, and
every tensor of a step has a shape fixed by the config and the batch's shape, never by its
content: anchors are ``C * (anchors_hard + anchors_random)`` slots with a valid mask, the
negatives are drawn over every bank slot with the empty ones masked out, and averages are
taken over the valid entries on the device. So a training step never waits for the host
(no ``nonzero``, ``item`` or boolean-mask indexing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gpual.config import ContrastiveConfig
from gpual.memory_bank import MemoryBank
from gpual.model import embedding_at

IGNORE_INDEX = 255


# Random sort keys of the anchor draw: group * 2**_KEY_BITS + key, one int64 sort.
_KEY_BITS = 50
_MAX_GROUPS = 2 ** (63 - _KEY_BITS) - 1


@dataclass(frozen=True)
class Anchors:
    """Sampled anchor slots, class-major: per class ``n_hard`` hard slots, then ``n_random``
    random ones; (C * (n_hard + n_random),) each, on the labels' device."""

    index: Tensor  # int64 flat indices into (B*H*W); some pixel of the batch where not valid
    label: Tensor  # int64 the slot's class
    hard: Tensor  # bool: a hard slot (its pixel, where valid, was misclassified)
    valid: Tensor  # bool: the slot holds a sampled pixel


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean CE over labeled pixels (Eq. 2); exactly 0 (with a graph) when no pixel is labeled.

    logits (B, C, H, W) float, labels (B, H, W) int64 with ``ignore_index`` for unlabeled.
    The count is clamped at 1 on the device instead of tested on the host: torch's own mean
    is NaN (0/0) for an all-ignored batch.
    """
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)


def _random_pick(group: Tensor, groups: int, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Up to ``k`` members of each group, uniformly without replacement, in a fixed shape.

    Pixels are sorted by (group, independent random key); a group's first ``k`` pixels in
    that order are its draw, found by a binary search for where each group starts.

    Args:
        group: (N,) int64 in [0, groups], N > 0; ``groups`` marks pixels of no group.
    Returns:
        (index (groups, k) int64 pixel ids, valid (groups, k) bool, picked (N,) bool), on
        ``group``'s device; a group with fewer than k members pads with invalid slots.
    """
    n = group.numel()
    key = torch.randint(0, 2**_KEY_BITS, (n,), generator=generator, device=generator.device).to(group.device)
    sorted_key, order = torch.sort(group * 2**_KEY_BITS + key)
    bounds = torch.searchsorted(sorted_key, torch.arange(groups + 1, device=group.device) * 2**_KEY_BITS)
    position = bounds[:-1].unsqueeze(1) + torch.arange(k, device=group.device)  # (groups, k)
    valid = position < bounds[1:].unsqueeze(1)
    # A pixel's rank within its group, scattered back through the permutation (distinct indices).
    sorted_group = sorted_key >> _KEY_BITS
    rank = torch.arange(n, device=group.device) - bounds[sorted_group]
    picked = torch.zeros(n, dtype=torch.bool, device=group.device)
    picked.scatter_(0, order, (rank < k) & (sorted_group < groups))
    return order[position.clamp(max=n - 1)], valid, picked


def sample_anchors(labels: Tensor, pred: Tensor, eligible: Tensor, n_hard: int, n_random: int,
                   generator: torch.Generator) -> Anchors:
    """Per class with ``eligible`` set: up to ``n_hard`` misclassified pixels (uniformly among
    them), then up to ``n_random`` pixels uniformly from the class's remaining pixels.

    Args:
        labels: (N,) int64 flat labels, N > 0 (unlabeled pixels carry a value outside [0, C)).
        pred: (N,) int64 predicted classes, same device.
        eligible: (C,) bool, same device: the classes that may give anchors (those with a
            positive and a negative in the bank).
    Returns:
        Anchors: C * (n_hard + n_random) slots, class by class, hard slots first; exactly
        min(n_hard, misclassified) hard and min(n_random, rest) random ones are valid per
        eligible class, none for the others.
    """
    c = eligible.numel()
    if not 0 < c <= _MAX_GROUPS:
        raise ValueError(f"sample_anchors: {c} classes, expected 1..{_MAX_GROUPS}")
    labels = labels.long()
    member = (labels >= 0) & (labels < c) & eligible[labels.clamp(0, c - 1)]
    outside = torch.full_like(labels, c)
    wrong = member & (pred != labels)
    hard_index, hard_valid, hard = _random_pick(torch.where(wrong, labels, outside), c, n_hard, generator)
    rest_index, rest_valid, _ = _random_pick(torch.where(member & ~hard, labels, outside), c, n_random, generator)
    per_class = n_hard + n_random
    kind = torch.arange(per_class, device=labels.device) < n_hard
    return Anchors(
        index=torch.cat([hard_index, rest_index], 1).reshape(-1),
        label=torch.arange(c, device=labels.device).repeat_interleave(per_class),
        hard=kind.repeat(c),
        valid=torch.cat([hard_valid, rest_valid], 1).reshape(-1),
    )


def sample_negatives(similarity: Tensor, anchor_label: Tensor, bank_label: Tensor, n_hard: int, n_random: int,
                     generator: torch.Generator, bank_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Choose negatives for every anchor among the bank vectors of other classes.

    Args:
        similarity: (A, N) cosine similarity of each anchor to each bank vector (no grad needed).
        anchor_label: (A,) int64; bank_label: (N,) int64.
        bank_valid: (N,) bool, the bank entries that hold a vector (:meth:`MemoryBank.slots`);
            None: all of them.
    Returns:
        (index (A, K) int64 into the bank, valid (A, K) bool), K = min(n_hard, N) +
        min(n_random, N): first the hardest negatives in decreasing similarity, then ones
        drawn uniformly from the remaining valid other-class entries; slots beyond an
        anchor's available negatives are ``valid = False``.
    """
    a, n = similarity.shape
    other = anchor_label.view(a, 1) != bank_label.view(1, n)  # (A, N): allowed negatives
    if bank_valid is not None:
        other = other & bank_valid.view(1, n)
    sim = similarity.detach().masked_fill(~other, -torch.inf)
    k_hard, k_random = min(n_hard, n), min(n_random, n)
    hard_sim, hard_index = sim.topk(k_hard, dim=1) if k_hard else (sim[:, :0], sim[:, :0].long())
    hard_valid = torch.isfinite(hard_sim)
    # Uniform draws without replacement among what remains: rank independent random keys.
    keys = torch.rand(a, n, generator=generator, device=generator.device).to(sim.device)
    remaining = other.clone()
    remaining.scatter_(1, hard_index, False)
    keys = keys.masked_fill(~remaining, -1.0)  # keys are in [0, 1): excluded ones rank last
    rand_key, rand_index = keys.topk(k_random, dim=1) if k_random else (keys[:, :0], keys[:, :0].long())
    rand_valid = rand_key >= 0
    return torch.cat([hard_index, rand_index], 1), torch.cat([hard_valid, rand_valid], 1)


def info_nce(positive: Tensor, negatives: Tensor, valid: Tensor, temperature: float,
             anchor_valid: Tensor | None = None) -> Tensor:
    """Eq. 3 averaged over anchors: mean_i -log( e^{s+_i/t} / (e^{s+_i/t} + sum_j e^{s-_ij/t}) ).

    Args:
        positive: (A,) similarity of each anchor to its positive.
        negatives: (A, K) similarities to the negatives; ``valid`` (A, K) bool marks real ones.
        anchor_valid: (A,) bool, the anchors that count; None: all. The mean is taken over
            them on the device (0 when none), and the others' terms, finite, get no gradient.
    Returns:
        scalar; 0 for A = 0 or no valid anchor.
    """
    if positive.numel() == 0:
        return positive.sum() * 0.0
    logits = torch.cat([positive.unsqueeze(1), negatives.masked_fill(~valid, -torch.inf)], dim=1) / temperature
    per_anchor = -(logits[:, 0] - torch.logsumexp(logits, dim=1))
    if anchor_valid is None:
        return per_anchor.mean()
    # where, not a product: a masked-out term's gradient is exactly 0 whatever its value.
    total = torch.where(anchor_valid, per_anchor, 0.0).sum()
    return total / anchor_valid.sum().clamp(min=1).to(total.dtype)


def contrastive_loss(embedding: Tensor, logits: Tensor, labels: Tensor, bank: MemoryBank, cfg: ContrastiveConfig,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The batch's InfoNCE term against ``bank`` and the number of anchors used, both 0-d
    tensors on the device (the count int64); no host synchronisation.

    Args:
        embedding: (B, D, H, W) per-pixel embeddings, or the (B, D, h, w) map they are
            upsampled from (``forward_projection``'s projection); anchors are read with
            :func:`gpual.model.embedding_at`. Gradients flow into it.
        logits: (B, C, H, W) (detached is fine: only the argmax is used, for hard anchors).
        labels: (B, H, W) int64, ``IGNORE_INDEX`` where unlabeled.
    """
    h, w = labels.shape[-2:]
    counts = bank.counts()
    # A class needs a positive (its own queue) and at least one negative (another class's queue).
    eligible = (counts > 0) & (counts.sum() - counts > 0)
    anchors = sample_anchors(labels.reshape(-1), logits.argmax(1).reshape(-1), eligible, cfg.anchors_hard,
                             cfg.anchors_random, generator)
    used = anchors.valid.sum()
    if anchors.index.numel() == 0:  # no anchor slots at all (both anchor counts 0): a config, known on the host
        return embedding.sum() * 0.0, used
    anchor = embedding_at(embedding, anchors.index, (h, w))  # (A, D), with grad
    positive = F.normalize(bank.class_means(), dim=1)[anchors.label]  # (A, D), no grad
    bank_vectors, bank_label, bank_valid = bank.slots()
    similarity = anchor @ bank_vectors.T  # (A, C * P)
    neg_index, neg_valid = sample_negatives(similarity, anchors.label, bank_label, cfg.negatives_hard,
                                            cfg.negatives_random, generator, bank_valid)
    loss = info_nce((anchor * positive).sum(1), similarity.gather(1, neg_index), neg_valid, cfg.temperature,
                    anchors.valid)
    return loss, used
