"""RegionPooler against a naive per-region loop, padding, renormalisation, BALD, memory."""
from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpual.errors import GpualError
from gpual.acquisition.pooling import RegionPooler, bald_information, pixel_entropy


def _batch(g: torch.Generator, regions_per_image: list[int], offsets: list[int], c: int, d: int, h: int, w: int,
           mc: int = 0) -> tuple[torch.Tensor, ...]:
    """Random probabilities/embeddings and global region ids (image offset + local id),
    with the bottom rows of the last image padded (-1) as a batch of unequal images is.
    The pooler's spans are ``list(zip(offsets, regions_per_image))``."""
    b = len(regions_per_image)
    probs = torch.softmax(3 * torch.randn(b, c, h, w, generator=g), dim=1)
    emb = torch.nn.functional.normalize(torch.randn(b, d, h, w, generator=g), dim=1)
    ids = torch.stack([torch.randint(0, n, (h, w), generator=g) + off for n, off in zip(regions_per_image, offsets)])
    ids[-1, h - 2 :] = -1
    mc_probs = torch.softmax(3 * torch.randn(mc, b, c, h, w, generator=g), dim=2) if mc else None
    return probs, emb, ids, mc_probs


def _naive(batches: list[tuple[torch.Tensor, ...]], n_regions: int, d: int) -> dict[str, np.ndarray]:
    """Per-region Python loop in float64: the definition the pooler must match."""
    pix_p, pix_e, pix_id, pix_mc = [], [], [], []
    for probs, emb, ids, mc in batches:
        c = probs.shape[1]
        pix_p.append(probs.permute(0, 2, 3, 1).reshape(-1, c).double().numpy())
        pix_e.append(emb.permute(0, 2, 3, 1).reshape(-1, d).double().numpy())
        pix_id.append(ids.reshape(-1).numpy())
        if mc is not None:
            pix_mc.append(mc.permute(0, 1, 3, 4, 2).reshape(mc.shape[0], -1, c).double().numpy())
    p, e, rid = np.concatenate(pix_p), np.concatenate(pix_e), np.concatenate(pix_id)
    mcp = np.concatenate(pix_mc, axis=1) if pix_mc else None

    def entropy(q: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(q > 0, q * np.log2(q), 0.0).sum(-1)

    out = {k: np.zeros(n_regions) for k in ("entropy_sum", "entropy_mean", "margin_mean", "maxprob_mean", "bald", "pixels")}
    out["embedding"] = np.zeros((n_regions, d))
    out["class_votes"] = np.zeros((n_regions, p.shape[1]))
    for r in range(n_regions):
        sel = rid == r
        n = int(sel.sum())
        out["pixels"][r] = n
        out["class_votes"][r] = np.bincount(p[sel].argmax(1), minlength=p.shape[1])
        if n == 0:
            out["margin_mean"][r] = out["maxprob_mean"][r] = 1.0
            continue
        q = np.sort(p[sel], axis=1)
        h = entropy(p[sel])
        out["entropy_sum"][r] = h.sum()
        out["entropy_mean"][r] = h.mean()
        out["margin_mean"][r] = (q[:, -1] - q[:, -2]).mean()
        out["maxprob_mean"][r] = q[:, -1].mean()
        m = e[sel].mean(0)
        out["embedding"][r] = m / np.linalg.norm(m)
        if mcp is not None:
            t = mcp[:, sel]
            out["bald"][r] = np.clip(entropy(t.mean(0)) - entropy(t).mean(0), 0, None).sum()
    return out


# None: the embeddings come at the image's size; else the (h, w) of a projection map the
# pooler upsamples (downsampled by 4, by a ratio that is not an integer, or not at all).
# compile: the same fold through torch.compile (Inductor's C++ kernels here), over batches
# whose shapes differ (2, 2, 1 images; 10, 12, 9 slots), so it recompiles as a user's pool does.
@pytest.mark.parametrize(("projection_size", "compile"), [(None, False), ((3, 3), False), ((5, 4), False),
                                                          ((12, 10), False), ((5, 4), True)])
def test_pooler_matches_naive_loop_over_batches_with_global_offsets(projection_size, compile) -> None:
    if compile and not (shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++ or clang++), and none is on PATH")
    g = torch.Generator().manual_seed(0)
    c, d, h, w = 5, 8, 12, 10
    # 5 images of 7, 9, 6, 11, 8 regions in batches of 2, 2, 1; one region id left unused.
    sizes = [7, 9, 6, 11, 8]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    n_regions = sum(sizes) + 1
    pooler = RegionPooler(n_regions, d, "cpu", compile=compile)
    batches = []
    for lo, hi in ((0, 2), (2, 4), (4, 5)):
        probs, emb, ids, mc = _batch(g, sizes[lo:hi], offsets[lo:hi], c, d, h, w, mc=3)
        if projection_size is not None:
            # What the model does: upsample the projection head's map, then normalise each pixel.
            projection = torch.randn(hi - lo, d, *projection_size, generator=g)
            emb = F.normalize(F.interpolate(projection, size=(h, w), mode="bilinear", align_corners=False), dim=1)
        pooler.add(probs, emb if projection_size is None else projection, ids, list(zip(offsets[lo:hi], sizes[lo:hi])),
                   mc_probs=mc)
        batches.append((probs, emb, ids, mc))
    got = pooler.result()
    want = _naive(batches, n_regions, d)

    np.testing.assert_array_equal(got.pixels.numpy(), want["pixels"])
    assert got.pixels.dtype == torch.int64
    for key in ("entropy_sum", "entropy_mean", "margin_mean", "maxprob_mean", "bald"):
        tensor = getattr(got, key)
        assert tensor.dtype == torch.float32 and tensor.shape == (n_regions,), key
        np.testing.assert_allclose(tensor.numpy(), want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert got.embedding.shape == (n_regions, d) and got.embedding.dtype == torch.float32 and got.embedding.is_contiguous()
    np.testing.assert_allclose(got.embedding.numpy(), want["embedding"], rtol=1e-5, atol=1e-5)
    assert got.class_votes.shape == (n_regions, c) and got.class_votes.dtype == torch.float32
    np.testing.assert_array_equal(got.class_votes.numpy(), want["class_votes"])  # whole numbers: exact
    np.testing.assert_array_equal(got.predicted_class.numpy(), want["class_votes"].argmax(1))
    # Padding: 2 rows of the last image of each batch carry -1 and count nowhere.
    assert int(got.pixels.sum()) == 5 * h * w - 3 * 2 * w


def test_padding_only_batch_changes_nothing() -> None:
    g = torch.Generator().manual_seed(1)
    pooler = RegionPooler(6, 4, "cpu")
    probs, emb, ids, _ = _batch(g, [6], [0], 3, 4, 5, 5)
    pooler.add(probs, emb, ids, [(0, 6)])
    before = pooler.result()
    pad_probs, pad_emb, _, _ = _batch(g, [6], [0], 3, 4, 5, 5)
    pooler.add(pad_probs, 100 * pad_emb, torch.full((1, 5, 5), -1, dtype=torch.int64), [(0, 6)])
    after = pooler.result()
    for key in ("embedding", "entropy_sum", "margin_mean", "maxprob_mean", "pixels"):
        assert torch.equal(getattr(before, key), getattr(after, key)), key


def test_renormalised_mean_and_empty_regions() -> None:
    # Region 0: two pixels with embeddings (1,0) and (0,1) -> mean (0.5,0.5) -> unit (1,1)/sqrt2.
    # Region 1: no pixel -> zero embedding, read as fully certain.
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).T.reshape(1, 2, 1, 2)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)
    ids = torch.zeros(1, 1, 2, dtype=torch.int64)
    pooler = RegionPooler(2, 2, "cpu")
    pooler.add(probs, emb, ids, [(0, 2)])
    stats = pooler.result()
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(stats.embedding, torch.tensor([[s, s], [0.0, 0.0]]))
    torch.testing.assert_close(stats.pixels, torch.tensor([2, 0]))
    # Pixel entropies 1 bit and 0 bits (one-hot: 0 * log 0 = 0, no NaN).
    torch.testing.assert_close(stats.entropy_sum, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(stats.entropy_mean, torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(stats.margin_mean, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(stats.maxprob_mean, torch.tensor([0.75, 1.0]))
    assert stats.bald is None


def test_pixel_entropy_in_bits() -> None:
    p = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(pixel_entropy(p, dim=1), torch.tensor([2.0, 0.0, 1.0]))


def test_bald_hand_case() -> None:
    # Pixel a: the two passes disagree completely (one-hot 0 vs one-hot 1): H(mean) = 1 bit,
    # mean H = 0 -> 1 bit. Pixel b: both passes (0.5, 0.5): 1 - 1 = 0. Pixel c: passes
    # (0.5,0.5) and (1,0): H(0.75,0.25) - 0.5 = 0.311278 bits.
    h_c = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)) - 0.5
    pass1 = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    pass2 = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
    mc = torch.stack([pass1.T.reshape(1, 2, 1, 3), pass2.T.reshape(1, 2, 1, 3)])  # (T=2, B=1, C=2, H=1, W=3)
    torch.testing.assert_close(bald_information(mc), torch.tensor([[[1.0, 0.0, h_c]]]))
    # Region 0 = pixels a, b; region 1 = pixel c.
    pooler = RegionPooler(2, 1, "cpu")
    pooler.add(mc.mean(0), torch.ones(1, 1, 1, 3), torch.tensor([[[0, 0, 1]]]), [(0, 2)], mc_probs=mc)
    torch.testing.assert_close(pooler.result().bald, torch.tensor([1.0, h_c]))


def test_buffers_grow_with_regions_not_pixels() -> None:
    g = torch.Generator().manual_seed(2)
    n_regions, d = 40, 6
    pooler = RegionPooler(n_regions, d, "cpu")
    sizes_before = None
    for side in (4, 16, 48):  # 16 -> 2304 pixels per image
        probs, emb, ids, mc = _batch(g, [n_regions], [0], 3, d, side, side, mc=2)
        pooler.add(probs, emb, ids, [(0, n_regions)], mc_probs=mc)
        sizes = {k: (tuple(v.shape), v.untyped_storage().nbytes()) for k, v in pooler.buffers().items()}
        # One slot per region plus the padding sink; the embedding has D of them, the class votes C = 3.
        width = {"embedding": d, "class_votes": 3}
        assert all(math.prod(shape) == (n_regions + 1) * width.get(k, 1) for k, (shape, _) in sizes.items())
        assert sizes_before is None or sizes == sizes_before
        sizes_before = sizes
    stats = pooler.result()
    assert all(getattr(stats, k).shape[0] == n_regions for k in ("embedding", "entropy_sum", "pixels", "bald"))


def test_bad_inputs_raise_gpual_errors() -> None:
    pooler = RegionPooler(4, 3, "cpu")
    probs = torch.full((1, 2, 2, 2), 0.5)
    emb = torch.zeros(1, 3, 2, 2)
    ids = torch.zeros(1, 2, 2, dtype=torch.int64)
    span = [(0, 4)]
    with pytest.raises(GpualError, match="projection map of shape"):
        pooler.add(probs, torch.zeros(1, 4, 1, 1), ids, span)
    with pytest.raises(GpualError, match="int64 region ids"):
        pooler.add(probs, emb, ids.int(), span)
    with pytest.raises(GpualError, match="outside the pool's 4 regions"):
        pooler.add(probs, emb, ids + 4, [(4, 1)])
    with pytest.raises(GpualError, match="the image's regions are 0..3"):
        pooler.add(probs, emb, ids + 4, span)
    with pytest.raises(GpualError, match="the image's regions are 1..2"):
        pooler.add(probs, emb, ids, [(1, 2)])
    with pytest.raises(GpualError, match="one .* span per image"):
        pooler.add(probs, emb, ids, span * 2)
    with pytest.raises(GpualError, match="C>=2"):
        pooler.add(torch.ones(1, 1, 2, 2), emb, ids, span)
    pooler.add(probs, emb, ids, span)
    with pytest.raises(GpualError, match="every batch or for none"):
        pooler.add(probs, emb, ids, span, mc_probs=torch.stack([probs, probs]))
    with pytest.raises(GpualError, match="regions"):
        RegionPooler(0, 3, "cpu")


def test_add_leaves_the_callers_tensors_untouched() -> None:
    emb = torch.ones(1, 1, 1, 3)
    probs = torch.full((1, 2, 1, 3), 0.5)
    pooler = RegionPooler(2, 1, "cpu")
    pooler.add(probs, emb, torch.tensor([[[0, -1, 1]]]), [(0, 2)])
    assert torch.equal(emb, torch.ones(1, 1, 1, 3)) and torch.equal(probs, torch.full((1, 2, 1, 3), 0.5))
    torch.testing.assert_close(pooler.result().pixels, torch.tensor([1, 1]))


def test_pooled_embedding_of_a_model_equals_pooling_its_full_resolution_embedding() -> None:
    """The projection map pooled directly gives what pooling ``forward``'s (B, D, H, W)
    normalised embedding gives, for a real network at output stride 8."""
    from gpual.config import ModelConfig
    from gpual.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", projection_dim=16), 4).eval()
    x = torch.randn(2, 3, 45, 61)
    ids = torch.stack([(torch.arange(45)[:, None] // 7) * 9 + torch.arange(61)[None] // 7 + 63 * i for i in range(2)])
    with torch.no_grad():
        full, maps = model(x), model.forward_projection(x)
    probs = torch.softmax(full["logits"], 1)
    direct, reference = RegionPooler(126, 16, "cpu"), RegionPooler(126, 16, "cpu")
    direct.add(probs, maps["projection"], ids, [(0, 63), (63, 63)])
    reference.add(probs, full["embedding"], ids, [(0, 63), (63, 63)])
    assert maps["projection"].shape[-2:] == (6, 8)
    torch.testing.assert_close(direct.result().embedding, reference.result().embedding, rtol=1e-5, atol=1e-5)


def test_class_votes_count_each_pixels_most_probable_class() -> None:
    """Region 0: pixels predicting 1, 1, 0 -> votes (1, 2, 0), class 1; region 1: a 0.4/0.4/0.2
    tie -> the first class, 0; region 2: no pixel -> zero votes, class 0; padding counts nowhere."""
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.4, 0.4, 0.2], [0.0, 0.0, 1.0]])
    ids = torch.tensor([[[0, 0, 0, 1, -1]]])
    pooler = RegionPooler(3, 1, "cpu")
    pooler.add(probs.T.reshape(1, 3, 1, 5), torch.ones(1, 1, 1, 5), ids, [(0, 3)])
    stats = pooler.result()
    torch.testing.assert_close(stats.class_votes, torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert stats.predicted_class.tolist() == [1, 0, 0]
    assert pooler.buffers()["class_votes"][3].tolist() == [0.0, 0.0, 1.0]  # the sink row took the padding pixel
    with pytest.raises(GpualError, match="this batch has 2 classes, the earlier ones 3"):
        pooler.add(torch.full((1, 2, 1, 5), 0.5), torch.ones(1, 1, 1, 5), ids, [(0, 3)])


def test_top_two_equals_topk_ties_included() -> None:
    from gpual.acquisition.pooling import top_two

    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(2, 11, 5, 6, generator=g), dim=1)
    probs[0, :, 0, 0] = torch.tensor([0.3, 0.3, 0.1, 0.1, 0.1, 0.1, 0, 0, 0, 0, 0])  # a tie for first
    first, second = top_two(probs)
    expected = probs.topk(2, dim=1).values
    assert torch.equal(first, expected[:, 0]) and torch.equal(second, expected[:, 1])
    assert first[0, 0, 0] == second[0, 0, 0] == pytest.approx(0.3)
