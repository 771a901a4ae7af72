"""The per-class memory bank of pixel embeddings (paper section 3.2, "Memory Bank Design").

One FIFO queue per class, ``capacity`` (P_t = 1000) vectors of ``dim`` (128) each, on the
model's device. During training, from each image of a batch and for each class, up to
``per_image`` (P_i = 10) labeled pixels that the model classifies *correctly* and with the
*highest entropy* (Eq. 4, log2) are pushed; the oldest entries of a full queue are
overwritten first. The bank serves the contrastive loss (class means are the positives,
other classes' entries the negatives) and, saved with the checkpoint, is what UMAP is
fitted on during acquisition.

A training step touches the bank on the device only: the push is one fixed-shape scatter
(:meth:`MemoryBank.update_from_batch`) and the loss reads fixed-shape slots with a valid
mask (:meth:`MemoryBank.slots`, :meth:`MemoryBank.counts`); host reads (:meth:`MemoryBank.filled`,
:meth:`MemoryBank.vectors`) are for summaries and acquisition.
"""
from __future__ import annotations

from typing import Any

import torch

from gpual.errors import GpualError
from gpual.acquisition.pooling import pixel_entropy  # Eq. 4 in bits: one definition for training and acquisition


class MemoryBank:
    """Per-class FIFO queues of L2-normalised embeddings, stored as one (C, P_t, D) tensor.

    ``_count[c]`` vectors of class ``c`` are valid; ``_next[c]`` is the slot the next push
    writes to (the oldest entry once the queue is full). Both are (C,) int64 tensors on the
    bank's device, so a training step's push and the contrastive loss never wait for the
    host. Until a queue is full its vectors fill slots ``0 .. _count[c] - 1`` (and
    ``_next[c] == _count[c]``): the valid slots of every class are the first ``_count[c]``.
    """

    def __init__(self, num_classes: int, capacity: int, dim: int, device: torch.device | str) -> None:
        if num_classes <= 0 or capacity <= 0 or dim <= 0:
            raise ValueError(f"MemoryBank needs positive sizes, got classes={num_classes}, capacity={capacity}, dim={dim}")
        self.num_classes = num_classes
        self.capacity = capacity
        self.dim = dim
        self.device = torch.device(device)
        self._store = torch.zeros(num_classes, capacity, dim, dtype=torch.float32, device=self.device)
        self._next = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self._count = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        # The class of every slot of the flattened store (see slots()).
        self._slot_class = torch.arange(num_classes, device=self.device).repeat_interleave(capacity)

    # --- writing ------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, class_id: int, vectors: torch.Tensor) -> None:
        """Append ``vectors`` (n, D) to class ``class_id``'s queue, oldest entries dropped first.

        If n > capacity only the last ``capacity`` vectors are kept, written from the queue's
        write position on (the position itself does not move). Vectors are detached and
        stored as float32 on the bank's device.
        """
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"class_id {class_id} is outside 0..{self.num_classes - 1}")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"push expects (n, {self.dim}) vectors, got {tuple(vectors.shape)}")
        n = vectors.shape[0]
        if n == 0:
            return
        vectors = vectors.detach().to(self.device, torch.float32)
        mine = torch.arange(self.num_classes, device=self.device) == class_id  # (C,)
        self._append(vectors.expand(self.num_classes, n, self.dim), mine.view(-1, 1).expand(-1, n))

    @torch.no_grad()
    def _append(self, vectors: torch.Tensor, valid: torch.Tensor) -> None:
        """Push, for every class ``c`` at once, the entries of row ``c`` with ``valid`` set,
        in row order: the same result, slot for slot, as ``push(c, vectors[c][valid[c]])``
        class by class, without reading a count on the host.

        Args:
            vectors: (C, M, D) float32 on the bank's device (an expanded view is fine).
            valid: (C, M) bool, same device.
        """
        c, m, d = vectors.shape
        p = self.capacity
        pushed = valid.sum(1)  # (C,) entries per class
        kept = pushed.clamp(max=p)  # a push of more than P keeps its last P
        step = torch.arange(min(m, p), device=self.device)  # the j-th written slot from _next on
        # The j-th kept entry is the (pushed - kept + j)-th valid one of its row; the
        # running count of valid entries finds its position in the row.
        rank = (pushed - kept).unsqueeze(1) + step  # (C, L)
        source = torch.searchsorted(valid.cumsum(1), rank + 1).clamp(max=m - 1)  # (C, L)
        slot = ((self._next.unsqueeze(1) + step) % p).unsqueeze(2).expand(-1, -1, d)  # distinct within a row
        new = vectors.gather(1, source.unsqueeze(2).expand(-1, -1, d))
        # Slots past a class's kept entries are written with their own value: every index of
        # the scatter is distinct, so it is deterministic on every device.
        written = (step < kept.unsqueeze(1)).unsqueeze(2)
        self._store.scatter_(1, slot, torch.where(written, new, self._store.gather(1, slot)))
        self._next = (self._next + kept) % p
        self._count = (self._count + kept).clamp(max=p)

    @torch.no_grad()
    def update_from_batch(self, embedding: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, per_image: int) -> None:
        """The push rule: per image and class, up to ``per_image`` labeled pixels that are
        correctly classified, highest entropy (Eq. 4, bits) first (see :func:`push_candidates`),
        pushed class by class in the order class, image, decreasing entropy; one scatter on
        the device, no host synchronisation.

        Args:
            embedding: (B, D, H, W) per-pixel embeddings, or the (B, D, h, w) map they are
                bilinearly upsampled from (``SegmentationModel.forward_projection``'s projection);
                pushed vectors are :func:`gpual.model.embedding_at` of the chosen pixels.
            probs: (B, C, H, W) softmax probabilities, on the bank's device.
            labels: (B, H, W) int; values outside [0, C) (255 = unlabeled/void) are skipped.
            per_image: P_i.
        """
        from gpual.model import embedding_at

        b, c, h, w = probs.shape
        if c != self.num_classes or embedding.shape[:2] != (b, self.dim):
            raise ValueError(
                f"update_from_batch: embedding {tuple(embedding.shape)}, probs {tuple(probs.shape)} do not fit a bank "
                f"of {self.num_classes} classes x {self.dim} dims"
            )
        index, _, valid = push_candidates(probs, labels, per_image)
        if index.numel() == 0:  # per_image = 0: a shape, known on the host
            return
        # Candidates come class-major, a fixed number per class: row c of the (C, B*k) view is class c's.
        vectors = embedding_at(embedding.detach(), index, (h, w)).to(self.device, torch.float32)
        self._append(vectors.view(c, -1, self.dim), valid.view(c, -1).to(self.device))

    # --- reading ------------------------------------------------------------------------
    def filled(self) -> torch.Tensor:
        """(C,) int64 number of stored vectors per class, copied to the host (summaries,
        acquisition; a training step reads :meth:`counts`)."""
        return self._count.to("cpu", copy=True)

    def counts(self) -> torch.Tensor:
        """(C,) int64 number of stored vectors per class on the bank's device (no host
        synchronisation). A snapshot: later pushes do not change it."""
        return self._count

    def slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every slot of the bank, in a shape that does not depend on how full it is:
        ((C*P, D) float32 vectors, (C*P,) int64 class ids, (C*P,) bool valid), on the bank's
        device; class-major, slot order within a class (not queue order). Invalid slots
        hold zeros. What the contrastive loss reads each step."""
        valid = torch.arange(self.capacity, device=self.device).unsqueeze(0) < self._count.unsqueeze(1)
        return self._store.view(-1, self.dim), self._slot_class, valid.view(-1)

    def queue(self, class_id: int) -> torch.Tensor:
        """(n, D) float32 stored vectors of one class, oldest first, on the bank's device."""
        n = int(self._count[class_id])
        if n < self.capacity:
            return self._store[class_id, :n]
        start = int(self._next[class_id])
        return torch.cat([self._store[class_id, start:], self._store[class_id, :start]])

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored vectors: ((N, D) float32, (N,) int64 class ids), class by class, each
        queue oldest first, on the bank's device. UMAP is fitted on these."""
        parts = [self.queue(c) for c in range(self.num_classes)]
        ids = torch.repeat_interleave(torch.arange(self.num_classes), self.filled()).to(self.device)
        return torch.cat(parts), ids

    def class_means(self) -> torch.Tensor:
        """(C, D) float32 mean stored vector per class (not re-normalised), on the bank's
        device; zero rows for empty classes, which ``counts() == 0`` marks."""
        sums = self._store.sum(dim=1)  # empty slots are zero, so they do not bias the sum
        return sums / self._count.clamp(min=1).to(torch.float32).unsqueeze(1)

    # --- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "capacity": self.capacity,
            "dim": self.dim,
            "store": self._store,
            "next": self._next,
            "count": self._count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = (state.get("num_classes"), state.get("capacity"), state.get("dim"))
        if shape != (self.num_classes, self.capacity, self.dim):
            raise GpualError(
                f"memory bank in the checkpoint is {shape[0]} classes x {shape[1]} x {shape[2]} but "
                f"{self.num_classes} x {self.capacity} x {self.dim} is expected: the config changed since it was saved; "
                "restore the config or train from scratch"
            )
        self._store = state["store"].to(self.device, torch.float32).clone()
        # Files written before the counters moved to the device hold them on the CPU.
        self._next = state["next"].to(self.device, torch.int64).clone()
        self._count = state["count"].to(self.device, torch.int64).clone()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str) -> "MemoryBank":
        bank = cls(int(state["num_classes"]), int(state["capacity"]), int(state["dim"]), device)
        bank.load_state_dict(state)
        return bank


@torch.no_grad()
def push_candidates(probs: torch.Tensor, labels: torch.Tensor, per_image: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pixels the push rule picks: per image and class, up to ``per_image`` labeled,
    correctly classified (argmax = label) pixels with the highest entropy (Eq. 4, bits).

    Args:
        probs: (B, C, H, W) probabilities; labels: (B, H, W) int (outside [0, C) = not labeled).
    Returns:
        (flat pixel index into (B, H, W) int64, class int64, valid bool), each (C*B*k,) with
        k = min(per_image, H*W), on ``probs``' device, ordered by class, then image, then
        decreasing entropy; ``valid`` marks the picked pixels (an (image, class) with fewer
        than k candidates pads its k slots with invalid ones, whose index is some pixel of
        that image). A fixed shape: nothing is read on the host.
    """
    b, c, h, w = probs.shape
    if per_image <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=probs.device)
        return empty, empty, empty.bool()
    entropy = pixel_entropy(probs.float()).reshape(b, h * w)  # (B, HW)
    labels = labels.reshape(b, h * w).long()
    correct = (probs.argmax(1).reshape(b, h * w) == labels) & (labels >= 0) & (labels < c)
    classes = torch.arange(c, device=labels.device).view(1, c, 1)
    # (B, C, HW): a pixel's entropy under its own class if it is a candidate, -inf elsewhere,
    # so one topk per (image, class) picks the push set without Python loops over images.
    score = torch.where((labels.unsqueeze(1) == classes) & correct.unsqueeze(1), entropy.unsqueeze(1), -torch.inf)
    top, pixel = score.topk(min(per_image, h * w), dim=2)  # (B, C, k), decreasing entropy
    k = top.shape[2]
    image = torch.arange(b, device=probs.device).view(b, 1, 1)
    index = (image * (h * w) + pixel).permute(1, 0, 2).reshape(-1)  # (C, B, k) -> class-major
    cls = classes.view(c, 1, 1).expand(c, b, k).reshape(-1)
    return index, cls, torch.isfinite(top).permute(1, 0, 2).reshape(-1)
