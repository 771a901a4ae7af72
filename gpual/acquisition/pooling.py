"""Per-superpixel pooling of the teacher's outputs (method step 2).

The teacher runs over the pool batch by batch; each batch's per-pixel probabilities and
its projection map are folded at once into per-region sums with torch scatter ops
(``index_add_``) and one small matrix product per image, on the model's device. The
per-pixel embeddings (the projection map upsampled to the image and L2-normalised) are
pooled exactly without ever being built (see :class:`RegionPooler`). The pooler's buffers
have one row per region, so memory grows with the number of regions ``R``, never with the
pool's pixels, and no value leaves the device (no host sync: padding pixels are sent to a
sink row, not removed by boolean indexing, whose output size would have to be read back
to the host).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gpual.errors import GpualError

_LN2 = math.log(2.0)


@dataclass
class RegionStats:
    """Pooled statistics, one row per region of the pool (candidate or not).

    All tensors live on the model's device. Regions that received no pixel read as fully
    certain (entropy 0, margin 1, max probability 1, BALD 0, zero embedding), so no
    uncertainty strategy prefers them.

    Attributes:
        embedding: (R, D) float32, mean pixel embedding re-normalised to unit L2 norm
            (a zero mean stays the zero vector).
        entropy_sum: (R,) float32, H(S) = sum over the region's pixels of
            H(x) = -sum_c p_c log2 p_c, in bits (paper Eq. 4 and 6).
        entropy_mean: (R,) float32, H(S) / pixels, bits per pixel.
        margin_mean: (R,) float32, mean over pixels of p1 - p2 (top-two probabilities);
            smaller = more uncertain.
        maxprob_mean: (R,) float32, mean over pixels of max_c p_c.
        bald: (R,) float32 summed BALD mutual information in bits, or None when no
            Monte-Carlo dropout passes were given.
        pixels: (R,) int64 pixel count.
        class_votes: (R, C) float32, per region the number of its pixels whose most probable
            class is c (whole numbers, exact below 2**24 pixels a region), or None where
            not pooled (the random strategy's statistics; older callers).
    """

    embedding: Tensor
    entropy_sum: Tensor
    entropy_mean: Tensor
    margin_mean: Tensor
    maxprob_mean: Tensor
    bald: Tensor | None
    pixels: Tensor
    class_votes: Tensor | None = None

    @property
    def n_regions(self) -> int:
        return self.pixels.shape[0]

    @property
    def predicted_class(self) -> Tensor | None:
        """(R,) int64, each region's dominant predicted class: the class most of its pixels
        are predicted as (ties: the lowest class; a region with no pixel reads class 0), the
        prediction's twin of ``acquisition.oracle = "dominant"``; None without ``class_votes``."""
        return None if self.class_votes is None else self.class_votes.argmax(dim=1)


def pixel_entropy(probs: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy in bits along ``dim`` (paper Eq. 4), with 0 * log 0 = 0.

    ``probs``: probabilities (any shape, float); returns ``probs`` without ``dim``, same
    dtype and device.
    """
    # xlogy(0, 0) == 0, so one-hot pixels give exactly 0 instead of NaN.
    return -torch.special.xlogy(probs, probs).sum(dim=dim) / _LN2


def bald_information(mc_probs: Tensor) -> Tensor:
    """Per-pixel BALD mutual information in bits from Monte-Carlo dropout samples.

    ``mc_probs``: (T, B, C, H, W) softmax probabilities of T stochastic passes. Returns
    (B, H, W) = H(mean_t p_t) - mean_t H(p_t), clamped at 0 against rounding.
    """
    predictive = pixel_entropy(mc_probs.mean(dim=0), dim=1)
    expected = pixel_entropy(mc_probs, dim=2).mean(dim=0)
    return (predictive - expected).clamp_min(0.0)


def _upsampled_norms(projection: Tensor, corner: Tensor, weight: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, H*W) norms of the bilinearly upsampled map at every pixel, floored at ``eps`` as
    ``F.normalize`` does, from the dot products of neighbouring cells of ``projection``
    (B, D, h, w); ``corner``/``weight``: (4, H*W) source cells (a, b, c, d: top-left,
    top-right, bottom-left, bottom-right) and weights, as :meth:`RegionPooler.add` builds them.

    ||sum_k w_k p_k||^2 = sum_k w_k^2 |p_k|^2 + 2 sum_{k<l} w_k w_l <p_k, p_l>, where b is
    the right neighbour of a (or a itself at the last column: the map is padded by
    repeating its last row and column, as PyTorch clamps), c the one below, d below-right.
    """
    b, d, h, w = projection.shape
    padded = F.pad(projection, (0, 1, 0, 1), mode="replicate")
    here, right = padded[:, :, :h, :w], padded[:, :, :h, 1:]
    below, below_right = padded[:, :, 1:, :w], padded[:, :, 1:, 1:]

    def dots(u: Tensor, v: Tensor) -> Tensor:
        return (u * v).sum(1).reshape(b, h * w)

    squares, across, down = dots(here, here), dots(here, right), dots(here, below)
    diagonal, anti = dots(here, below_right), dots(right, below)
    a, bb, c, dd = corner
    wa, wb, wc, wd = weight
    total = (wa * wa * squares[:, a] + wb * wb * squares[:, bb] + wc * wc * squares[:, c] + wd * wd * squares[:, dd]
             + 2 * (wa * wb * across[:, a] + wc * wd * across[:, c] + wa * wc * down[:, a] + wb * wd * down[:, bb]
                    + wa * wd * diagonal[:, a] + wb * wc * anti[:, a]))
    return total.clamp_min(0.0).sqrt().clamp_min(eps)


def top_two(probs: Tensor) -> tuple[Tensor, Tensor]:
    """The largest and second-largest probability of every pixel, as ``topk(2, dim=1)``.

    ``probs``: (B, C, H, W), C >= 2. Returns two (B, H, W) tensors. A max, an argmax
    and a max of the tensor with that one entry masked: on CUDA this is several times
    faster than ``topk`` over the short, strided class dimension. Ties behave as ``topk``:
    only one entry is masked, so two equal maxima give a second value equal to the first.
    """
    first, second, _ = _top_two_and_class(probs)
    return first, second


def _top_two_and_class(probs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`top_two` and the argmax it computes on the way: (B, H, W) int64 most probable
    class of every pixel (ties: the first maximum torch's ``max`` reports)."""
    first, arg = probs.max(dim=1, keepdim=True)
    # scatter, not torch.where(classes == arg, -inf, probs): with the select, pooling 16
    # CamVid frames took 1.98 ms on an H200 (its compare and select 0.18 ms of it), with
    # scatter 1.83 ms (another H200, earlier the same day); CPU twin: 51 vs 36 ms per 8 frames.
    second = probs.scatter(1, arg, float("-inf")).amax(dim=1)
    return first.squeeze(1), second, arg.squeeze(1)


def _fold_batch(probs: Tensor, projection: Tensor, region_ids: Tensor, corner: Tensor, weight: Tensor, span: Tensor,
                slots: int, sink: int, entropy: Tensor, maxprob: Tensor, margin: Tensor, pixels: Tensor,
                embedding: Tensor, bald: Tensor | None = None, mc_probs: Tensor | None = None,
                votes: Tensor | None = None) -> None:
    """Add one batch's per-region sums to the pooler's buffers, in place (all on one device).

    Args:
        probs: (B, C, H, W) float32 probabilities; projection: (B, D, h, w) float32 map.
        region_ids: (B, H, W) int64 global ids, -1 for padding.
        corner, weight: (4, H*W) bilinear source cells and weights (:meth:`RegionPooler._bilinear`).
        span: (B, 2) int64 (first region, count) per image; slots: the largest count + 1.
        sink: the buffers' last row (= the pool's region count), which collects padding.
        entropy, maxprob, margin: (sink + 1,) float32; pixels: (sink + 1,) int64;
        embedding: (sink + 1, D) float32.
        bald: (sink + 1,) float32 and mc_probs: (T, B, C, H, W) float32 Monte-Carlo dropout
            probabilities, both or neither.
        votes: (sink + 1, C) float32 per-region counts of each pixel's most probable class,
            or None.

    Pure tensor code with no host sync and no data-dependent shape, so
    ``RegionPooler(compile=True)`` can hand it to ``torch.compile`` whole.
    """
    # Padding pixels go to the sink row: no masking, no boolean indexing, no sync.
    index = torch.where(region_ids >= 0, region_ids, sink).reshape(-1)
    entropy.index_add_(0, index, pixel_entropy(probs, dim=1).reshape(-1))
    first, second, arg = _top_two_and_class(probs)
    maxprob.index_add_(0, index, first.reshape(-1))
    margin.index_add_(0, index, (first - second).reshape(-1))
    pixels.index_add_(0, index, torch.ones_like(index))
    if votes is not None:
        # One flat scatter of B*H*W ones at (region, class): as cheap as the pixel count,
        # and no (B*H*W, C) copy of the probabilities.
        classes = votes.shape[1]
        votes.view(-1).index_add_(0, index * classes + arg.reshape(-1), torch.ones_like(first).reshape(-1))
    if bald is not None and mc_probs is not None:
        bald.index_add_(0, index, bald_information(mc_probs).reshape(-1))

    # Embeddings as A @ P per image, all images in one batched product: A (B, slots,
    # cells) holds every pixel's four bilinear weights divided by its upsampled norm.
    # Image b's rows 0..count_b-1 are regions start_b.. of the pool; its last slot and
    # the rows past count_b go to the sink.
    b, d, h, w = projection.shape
    cells = h * w
    norm = _upsampled_norms(projection, corner, weight)  # (B, H*W)
    start, count = span[:, :1], span[:, 1:]
    local = torch.where(region_ids >= 0, region_ids - start.view(b, 1, 1), slots - 1).reshape(b, 1, -1)
    image = torch.arange(b, device=probs.device).view(b, 1, 1)
    keys = ((image * slots + local) * cells + corner).reshape(-1)  # (B * 4 * H*W,) into A
    a = torch.zeros(b * slots * cells, dtype=torch.float32, device=probs.device)
    a.index_add_(0, keys, (weight / norm.unsqueeze(1)).reshape(-1))
    sums = torch.bmm(a.view(b, slots, cells), projection.reshape(b, d, cells).transpose(1, 2))  # (B, slots, D)
    slot = torch.arange(slots, device=probs.device)
    rows = torch.where(slot < count, start + slot, sink)  # (B, slots) pool rows
    embedding.index_add_(0, rows.reshape(-1), sums.reshape(-1, d))


Spans = Sequence[tuple[int, int]]


class RegionPooler:
    """Accumulates per-region statistics over batches with torch scatter ops.

    Scalar statistics (entropy, margin, max probability, BALD, pixel count) and the votes
    of each pixel's most probable class are summed per pixel with ``index_add_``.
    Embeddings never exist per pixel: a pixel's embedding is the bilinear upsampling
    (align_corners=False) of the projection head's (D, h, w) map, L2-normalised, i.e. ``sum_k w_k p_k / ||sum_k w_k p_k||`` over its four source cells
    p_k, a linear combination of cells. So each image's region sums are ``A @ P``: ``A``
    (regions x cells) gathers every pixel's four weights divided by its norm (scattered
    with ``index_add_``), and the norms come from dot products between neighbouring cells
    (the 2x2 Gram of each pixel's cells), never from the (D, H, W) map.

    Memory: (R + 1, D + 3 + C) float32 (+ (R + 1,) for BALD) and (R + 1,) int64 on ``device``,
    whatever the pool's pixel count (row R collects padding), plus per batch a transient
    (B, r + 1, h * w) ``A`` (r = the most regions of an image in the batch: 75 MB for 16
    CamVid frames at 360x480, stride 8). Float sums on CUDA use atomics, so the last bits
    may differ from run to run.

    ``compile=True`` runs each batch through ``torch.compile`` (the same code, fused by
    Inductor: Triton kernels on CUDA, C++ on the CPU); ``benchmarks/pooling.py --compile
    both`` compares the two.
    """

    def __init__(self, n_regions: int, dim: int, device: torch.device | str, compile: bool = False) -> None:
        if n_regions <= 0:
            raise GpualError(f"cannot pool into {n_regions} regions: the superpixel index is empty; run `gpual superpixels`")
        if dim <= 0:
            raise GpualError(f"embedding dimension {dim} must be positive")
        self.n_regions = n_regions
        self.dim = dim
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" and "cuda:0" compare unequal; pin the index the tensors will carry.
            self.device = torch.device("cuda", torch.cuda.current_device())
        slots = n_regions + 1  # the last one collects padding and is never read
        f32 = dict(dtype=torch.float32, device=self.device)
        self._embedding = torch.zeros(slots, dim, **f32)
        self._entropy = torch.zeros(slots, **f32)
        self._margin = torch.zeros(slots, **f32)
        self._maxprob = torch.zeros(slots, **f32)
        self._pixels = torch.zeros(slots, dtype=torch.int64, device=self.device)
        self._bald: Tensor | None = None
        self._votes: Tensor | None = None  # (R + 1, C), allocated by the first batch (C known then)
        self._batches = 0
        self._geometry: dict[tuple[int, int, int, int], tuple[Tensor, Tensor]] = {}
        # torch.compile fuses the batch's dozen kernels into a few. Measured: 1.9x on the CPU
        # twin (Inductor's C++; 2 cores), no gain on an H200 (2.02 vs 1.98 ms per 16 CamVid
        # frames; not profiled yet), and the first batch pays the compilation (about 8 s cold
        # on the H200, 1-7 s here; each new batch shape may recompile once). So it is off by default.
        self._fold = torch.compile(_fold_batch, dynamic=None) if compile else _fold_batch

    def add(self, probs: Tensor, projection: Tensor, region_ids: Tensor, spans: Spans, mc_probs: Tensor | None = None) -> None:
        """Fold one batch into the per-region sums.

        Args:
            probs: (B, C, H, W) softmax probabilities, C >= 2.
            projection: (B, D, h, w) the projection head's map at any resolution (its
                bilinear upsampling to (H, W), L2-normalised over D, is each pixel's
                embedding, as :meth:`gpual.model.SegmentationModel.forward` computes it);
                at (H, W) it is each pixel's embedding before normalisation.
            region_ids: (B, H, W) int64 global region ids (image offset + local superpixel
                id); -1 marks padding, which is ignored.
            spans: per image, host ints (first region id, region count): image b's ids lie
                in [first, first + count) (or are -1).
            mc_probs: (T, B, C, H, W) probabilities of T Monte-Carlo dropout passes, for
                BALD; give it for every batch or for none.

        Tensors on the pooler's device. On CPU, ids outside their image's span raise
        :class:`GpualError`; on CUDA the check would need a host sync, so it is not made
        (the superpixel cache is checked against its index when it is read).
        """
        self._check(probs, projection, region_ids, spans, mc_probs)
        h, w = projection.shape[-2:]
        corner, weight = self._bilinear(h, w, *region_ids.shape[-2:])
        # One A per image (see _fold_batch): slots = the batch's largest region count + 1.
        slots = max(count for _, count in spans) + 1
        span = torch.tensor(spans, dtype=torch.int64).to(self.device, non_blocking=True)  # (B, 2)
        if mc_probs is not None and self._bald is None:
            self._bald = torch.zeros(self.n_regions + 1, dtype=torch.float32, device=self.device)
        if self._votes is None:
            self._votes = torch.zeros(self.n_regions + 1, probs.shape[1], dtype=torch.float32, device=self.device)
        self._fold(probs.float(), projection.float(), region_ids, corner, weight, span, slots, self.n_regions,
                   self._entropy, self._maxprob, self._margin, self._pixels, self._embedding,
                   self._bald, None if mc_probs is None else mc_probs.float(), self._votes)
        self._batches += 1

    def _bilinear(self, h: int, w: int, height: int, width: int) -> tuple[Tensor, Tensor]:
        """The four source cells of every pixel (a, b above; c, d below) in an (h, w) map
        upsampled to (height, width), and their weights: two (4, height * width) tensors
        on the device, computed once per size (batches of a pool mostly share one)."""
        from gpual.model import bilinear_source

        key = (h, w, height, width)
        if key not in self._geometry:
            y0, y1, ly = bilinear_source(torch.arange(height, device=self.device), h, height)
            x0, x1, lx = bilinear_source(torch.arange(width, device=self.device), w, width)
            corner = torch.stack([(y0 * w)[:, None] + x0, (y0 * w)[:, None] + x1, (y1 * w)[:, None] + x0,
                                  (y1 * w)[:, None] + x1]).reshape(4, -1)
            weight = torch.stack([(1 - ly)[:, None] * (1 - lx), (1 - ly)[:, None] * lx, ly[:, None] * (1 - lx),
                                  ly[:, None] * lx]).reshape(4, -1)
            self._geometry[key] = (corner, weight)
        return self._geometry[key]

    def _check(self, probs: Tensor, projection: Tensor, region_ids: Tensor, spans: Spans, mc_probs: Tensor | None) -> None:
        """Shapes, dtypes and devices (metadata only: nothing is read from the device)."""
        if probs.ndim != 4 or probs.shape[1] < 2:
            raise GpualError(f"pooling expects probabilities (B, C>=2, H, W), got shape {tuple(probs.shape)}")
        b, _, h, w = probs.shape
        if projection.ndim != 4 or tuple(projection.shape[:2]) != (b, self.dim):
            raise GpualError(f"pooling expects a projection map of shape ({b}, {self.dim}, h, w), got {tuple(projection.shape)}")
        if len(spans) != b:
            raise GpualError(f"pooling expects one (first region, count) span per image: {b} images, {len(spans)} spans")
        if tuple(region_ids.shape) != (b, h, w) or region_ids.dtype != torch.int64:
            raise GpualError(
                f"pooling expects int64 region ids of shape {(b, h, w)}, got {region_ids.dtype} {tuple(region_ids.shape)}"
            )
        for name, t in (("probabilities", probs), ("projection", projection), ("region ids", region_ids)):
            if t.device != self.device:
                raise GpualError(f"pooling: {name} are on {t.device} but the pooler is on {self.device}: move them first")
        if mc_probs is not None:
            if mc_probs.ndim != 5 or tuple(mc_probs.shape[1:]) != tuple(probs.shape):
                raise GpualError(
                    f"pooling expects MC-dropout probabilities (T, {b}, {probs.shape[1]}, {h}, {w}), got {tuple(mc_probs.shape)}"
                )
            if mc_probs.device != self.device:
                raise GpualError(f"pooling: MC-dropout probabilities are on {mc_probs.device}, the pooler on {self.device}")
        if self._votes is not None and probs.shape[1] != self._votes.shape[1]:
            raise GpualError(f"pooling: this batch has {probs.shape[1]} classes, the earlier ones {self._votes.shape[1]}")
        if self._batches and (mc_probs is None) != (self._bald is None):
            raise GpualError("pooling: MC-dropout probabilities must be given for every batch or for none (BALD)")
        for start, count in spans:
            if start < 0 or count < 0 or start + count > self.n_regions:
                raise GpualError(f"pooling: span ({start}, {count}) lies outside the pool's {self.n_regions} regions")
        if self.device.type == "cpu":  # host tensors: no device sync
            for ids, (start, count) in zip(region_ids, spans):
                valid = ids[ids >= 0]
                if valid.numel() and (int(valid.min()) < start or int(valid.max()) >= start + count):
                    raise GpualError(
                        f"region ids span [{int(valid.min())}, {int(valid.max())}] but the image's regions are "
                        f"{start}..{start + count - 1}: the superpixel index and the cached maps disagree; run `gpual superpixels` again"
                    )
                if int(ids.min()) < -1:
                    raise GpualError(f"region id {int(ids.min())}: ids are -1 (padding) or a region's: run `gpual superpixels` again")

    def result(self) -> RegionStats:
        """Means and re-normalised embeddings from the sums (new tensors; the pooler can keep adding)."""
        r = self.n_regions
        pixels = self._pixels[:r]
        empty = pixels == 0
        denom = pixels.to(torch.float32).clamp_min(1.0)
        mean = self._embedding[:r] / denom.unsqueeze(1)
        # normalize divides by max(norm, eps): a zero mean (empty region) stays zero.
        embedding = torch.nn.functional.normalize(mean, p=2.0, dim=1, eps=1e-12)
        one = torch.ones((), dtype=torch.float32, device=self.device)
        return RegionStats(
            embedding=embedding,
            entropy_sum=self._entropy[:r].clone(),
            entropy_mean=self._entropy[:r] / denom,
            margin_mean=torch.where(empty, one, self._margin[:r] / denom),
            maxprob_mean=torch.where(empty, one, self._maxprob[:r] / denom),
            bald=None if self._bald is None else self._bald[:r].clone(),
            pixels=pixels.clone(),
            class_votes=None if self._votes is None else self._votes[:r].clone(),
        )

    def buffers(self) -> dict[str, Tensor]:
        """The accumulation buffers, sink row included (for memory accounting and tests)."""
        out = {
            "embedding": self._embedding,
            "entropy": self._entropy,
            "margin": self._margin,
            "maxprob": self._maxprob,
            "pixels": self._pixels,
        }
        if self._bald is not None:
            out["bald"] = self._bald
        if self._votes is not None:
            out["class_votes"] = self._votes
        return out
