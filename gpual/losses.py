"""Training losses: pixel-wise cross-entropy (Eq. 2) and the memory-bank InfoNCE (Eq. 3).

The contrastive term, per batch (paper section 3.2 and 4.2, docs/method.md):

- Anchors: for each class present among the batch's labeled pixels, ``anchors_hard`` (25)
  misclassified pixels and ``anchors_random`` (25) further pixels drawn uniformly from the
  rest of the class (fewer when fewer exist).
- Positive: the mean of the anchor's class queue in the memory bank, L2-normalised, so the
  positive logit is a cosine similarity on the same scale as the negatives' (the raw
  mean of unit vectors is shorter than 1 and would cap the positive logit).
- Negatives: from the other classes' queues, the ``negatives_hard`` (512) with the highest
  cosine similarity to the anchor, then ``negatives_random`` (512) drawn uniformly from the
  remaining ones (fewer when the bank holds fewer).
- Cold start: a class whose queue is empty has no positive, and an anchor with no
  negative has nothing to contrast with; such anchors are skipped. With no anchor left
  the term is exactly 0 (the loss is the cross-entropy alone).

All sampling is done on the embeddings' device with an explicit ``torch.Generator``.
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


@dataclass(frozen=True)
class Anchors:
    """Sampled anchor pixels: flat indices into (B*H*W), their classes, and which are hard."""

    index: Tensor  # (A,) int64
    label: Tensor  # (A,) int64
    hard: Tensor  # (A,) bool: misclassified when sampled


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean CE over labeled pixels (Eq. 2); exactly 0 (with a graph) when no pixel is labeled.

    logits (B, C, H, W) float, labels (B, H, W) int64 with ``ignore_index`` for unlabeled.
    """
    if not bool((labels != ignore_index).any()):
        return logits.sum() * 0.0  # torch would return NaN (0/0) for an all-ignored batch
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


def _random_subset(candidates: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """Up to ``k`` entries of ``candidates`` (1-D), uniformly without replacement."""
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    order = torch.randperm(candidates.numel(), generator=generator, device=generator.device)
    return candidates[order[: min(k, candidates.numel())].to(candidates.device)]


def sample_anchors(labels: Tensor, pred: Tensor, classes: list[int], n_hard: int, n_random: int,
                   generator: torch.Generator) -> Anchors:
    """Per class in ``classes`` present in ``labels``: up to ``n_hard`` misclassified pixels
    (uniformly among them) plus up to ``n_random`` pixels uniformly from the class's other pixels.

    Args:
        labels: (N,) int64 flat labels (unlabeled pixels carry any value not in ``classes``).
        pred: (N,) int64 predicted classes, same device.
        classes: the classes eligible as anchors (those with a positive in the bank).
    Returns:
        Anchors, grouped by class in ``classes`` order, hard ones first within a class.
    """
    index, label, hard = [], [], []
    for c in classes:
        pixels = torch.nonzero(labels == c).flatten()
        if pixels.numel() == 0:
            continue
        wrong = pred[pixels] != c
        chosen_hard = _random_subset(pixels[wrong], n_hard, generator)
        rest = pixels[~torch.isin(pixels, chosen_hard)]
        chosen_random = _random_subset(rest, n_random, generator)
        index += [chosen_hard, chosen_random]
        label.append(torch.full((chosen_hard.numel() + chosen_random.numel(),), c, dtype=torch.int64, device=labels.device))
        hard += [torch.ones_like(chosen_hard, dtype=torch.bool), torch.zeros_like(chosen_random, dtype=torch.bool)]
    if not index:
        empty = labels.new_zeros(0, dtype=torch.int64)
        return Anchors(empty, empty, empty.bool())
    return Anchors(torch.cat(index), torch.cat(label), torch.cat(hard))


def sample_negatives(similarity: Tensor, anchor_label: Tensor, bank_label: Tensor, n_hard: int, n_random: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Choose negatives for every anchor among the bank vectors of other classes.

    Args:
        similarity: (A, N) cosine similarity of each anchor to each bank vector (no grad needed).
        anchor_label: (A,) int64; bank_label: (N,) int64.
    Returns:
        (index (A, K) int64 into the bank, valid (A, K) bool), K = min(n_hard, N) +
        min(n_random, N): first the hardest negatives in decreasing similarity, then the
        random ones; slots beyond an anchor's available negatives are ``valid = False``.
    """
    a, n = similarity.shape
    other = anchor_label.view(a, 1) != bank_label.view(1, n)  # (A, N): allowed negatives
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


def info_nce(positive: Tensor, negatives: Tensor, valid: Tensor, temperature: float) -> Tensor:
    """Eq. 3 averaged over anchors: mean_i -log( e^{s+_i/t} / (e^{s+_i/t} + sum_j e^{s-_ij/t}) ).

    Args:
        positive: (A,) similarity of each anchor to its positive.
        negatives: (A, K) similarities to the negatives; ``valid`` (A, K) bool marks real ones.
    Returns:
        scalar; 0 for A = 0.
    """
    if positive.numel() == 0:
        return positive.sum() * 0.0
    logits = torch.cat([positive.unsqueeze(1), negatives.masked_fill(~valid, -torch.inf)], dim=1) / temperature
    return -(logits[:, 0] - torch.logsumexp(logits, dim=1)).mean()


def contrastive_loss(embedding: Tensor, logits: Tensor, labels: Tensor, bank: MemoryBank, cfg: ContrastiveConfig,
                     generator: torch.Generator) -> tuple[Tensor, int]:
    """The batch's InfoNCE term against ``bank`` and the number of anchors used.

    Args:
        embedding: (B, D, H, W) per-pixel embeddings, or the (B, D, h, w) map they are
            upsampled from (``forward_projection``'s projection); anchors are read with
            :func:`gpual.model.embedding_at`. Gradients flow into it.
        logits: (B, C, H, W) (detached is fine: only the argmax is used, for hard anchors).
        labels: (B, H, W) int64, ``IGNORE_INDEX`` where unlabeled.
    """
    h, w = labels.shape[-2:]
    filled = bank.filled()
    bank_vectors, bank_label = bank.vectors()
    # A class needs a positive (its own queue) and at least one negative (another class's queue).
    eligible = [c for c in range(bank.num_classes) if filled[c] > 0 and int(filled.sum() - filled[c]) > 0]
    if not eligible:
        return embedding.sum() * 0.0, 0
    anchors = sample_anchors(labels.reshape(-1), logits.argmax(1).reshape(-1), eligible, cfg.anchors_hard,
                             cfg.anchors_random, generator)
    if anchors.index.numel() == 0:
        return embedding.sum() * 0.0, 0
    anchor = embedding_at(embedding, anchors.index, (h, w))  # (A, D), with grad
    positive = F.normalize(bank.class_means(), dim=1)[anchors.label]  # (A, D), no grad
    similarity = anchor @ bank_vectors.T  # (A, N)
    neg_index, neg_valid = sample_negatives(similarity, anchors.label, bank_label, cfg.negatives_hard,
                                            cfg.negatives_random, generator)
    loss = info_nce((anchor * positive).sum(1), similarity.gather(1, neg_index), neg_valid, cfg.temperature)
    return loss, int(anchors.index.numel())
