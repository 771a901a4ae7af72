"""The per-class memory bank of pixel embeddings (paper section 3.2, "Memory Bank Design").

One FIFO queue per class, ``capacity`` (P_t = 1000) vectors of ``dim`` (128) each, on the
model's device. During training, from each image of a batch and for each class, up to
``per_image`` (P_i = 10) labeled pixels that the model classifies *correctly* and with the
*highest entropy* (Eq. 4, log2) are pushed; the oldest entries of a full queue are
overwritten first. The bank serves the contrastive loss (class means are the positives,
other classes' entries the negatives) and, saved with the checkpoint, is what UMAP is
fitted on during acquisition.
"""
from __future__ import annotations

from typing import Any

import torch

from gpual.errors import GpualError
from gpual.acquisition.pooling import pixel_entropy  # Eq. 4 in bits: one definition for training and acquisition


class MemoryBank:
    """Per-class FIFO queues of L2-normalised embeddings, stored as one (C, P_t, D) tensor.

    ``_count[c]`` vectors of class ``c`` are valid; ``_next[c]`` is the slot the next push
    writes to (the oldest entry once the queue is full).
    """

    def __init__(self, num_classes: int, capacity: int, dim: int, device: torch.device | str) -> None:
        if num_classes <= 0 or capacity <= 0 or dim <= 0:
            raise ValueError(f"MemoryBank needs positive sizes, got classes={num_classes}, capacity={capacity}, dim={dim}")
        self.num_classes = num_classes
        self.capacity = capacity
        self.dim = dim
        self.device = torch.device(device)
        self._store = torch.zeros(num_classes, capacity, dim, dtype=torch.float32, device=self.device)
        self._next = torch.zeros(num_classes, dtype=torch.int64)  # host: tiny, read every push
        self._count = torch.zeros(num_classes, dtype=torch.int64)

    # --- writing ------------------------------------------------------------------------
    @torch.no_grad()
    def push(self, class_id: int, vectors: torch.Tensor) -> None:
        """Append ``vectors`` (n, D) to class ``class_id``'s queue, oldest entries dropped first.

        If n > capacity only the last ``capacity`` vectors are kept (as n single pushes would).
        Vectors are detached and stored as float32 on the bank's device.
        """
        if not 0 <= class_id < self.num_classes:
            raise ValueError(f"class_id {class_id} is outside 0..{self.num_classes - 1}")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"push expects (n, {self.dim}) vectors, got {tuple(vectors.shape)}")
        n = vectors.shape[0]
        if n == 0:
            return
        if n > self.capacity:
            vectors = vectors[n - self.capacity :]
            n = self.capacity
        start = int(self._next[class_id])
        slots = (torch.arange(n) + start) % self.capacity
        self._store[class_id, slots.to(self.device)] = vectors.detach().to(self.device, torch.float32)
        self._next[class_id] = (start + n) % self.capacity
        self._count[class_id] = min(int(self._count[class_id]) + n, self.capacity)

    @torch.no_grad()
    def update_from_batch(self, embedding: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor, per_image: int) -> None:
        """The push rule: per image and class, up to ``per_image`` labeled pixels that are
        correctly classified, highest entropy (Eq. 4, bits) first (see :func:`push_candidates`).

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
        index, label = push_candidates(probs, labels, per_image)
        if index.numel() == 0:
            return
        vectors = embedding_at(embedding.detach(), index, (h, w))
        for cls in torch.unique(label).tolist():  # sorted
            self.push(cls, vectors[label == cls])

    # --- reading ------------------------------------------------------------------------
    def filled(self) -> torch.Tensor:
        """(C,) int64 number of stored vectors per class (host)."""
        return self._count.clone()

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
        ids = torch.repeat_interleave(torch.arange(self.num_classes), self._count).to(self.device)
        return torch.cat(parts), ids

    def class_means(self) -> torch.Tensor:
        """(C, D) float32 mean stored vector per class (not re-normalised); zero rows for
        empty classes, which ``filled() == 0`` marks."""
        sums = self._store.sum(dim=1)  # empty slots are zero, so they do not bias the sum
        counts = self._count.to(self.device).clamp(min=1).to(torch.float32)
        return sums / counts.unsqueeze(1)

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
        self._next = state["next"].to("cpu", torch.int64).clone()
        self._count = state["count"].to("cpu", torch.int64).clone()

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str) -> "MemoryBank":
        bank = cls(int(state["num_classes"]), int(state["capacity"]), int(state["dim"]), device)
        bank.load_state_dict(state)
        return bank


@torch.no_grad()
def push_candidates(probs: torch.Tensor, labels: torch.Tensor, per_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels the push rule picks: per image and class, up to ``per_image`` labeled,
    correctly classified (argmax = label) pixels with the highest entropy (Eq. 4, bits).

    Args:
        probs: (B, C, H, W) probabilities; labels: (B, H, W) int (outside [0, C) = not labeled).
    Returns:
        (flat pixel index into (B, H, W) int64, class int64), ordered by class, then image,
        then decreasing entropy.
    """
    b, c, h, w = probs.shape
    if per_image <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=probs.device)
        return empty, empty
    entropy = pixel_entropy(probs.float()).reshape(b, h * w)  # (B, HW)
    labels = labels.reshape(b, h * w).long()
    correct = (probs.argmax(1).reshape(b, h * w) == labels) & (labels >= 0) & (labels < c)
    classes = torch.arange(c, device=labels.device).view(1, c, 1)
    # (B, C, HW): a pixel's entropy under its own class if it is a candidate, -inf elsewhere,
    # so one topk per (image, class) picks the push set without Python loops over images.
    score = torch.where((labels.unsqueeze(1) == classes) & correct.unsqueeze(1), entropy.unsqueeze(1), -torch.inf)
    top, pixel = score.topk(min(per_image, h * w), dim=2)  # (B, C, k), decreasing entropy
    order = torch.isfinite(top).permute(1, 0, 2)  # (C, B, k): class-major order
    cls, image, slot = torch.nonzero(order, as_tuple=True)
    return image * (h * w) + pixel[image, cls, slot], cls
