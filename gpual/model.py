"""The segmentation network: an FCN in torchvision's ``fcn_resnet50`` layout plus the
projection head of the contrastive loss (paper sections 3.2 and 4.2).

- ``backbone``: ``IntermediateLayerGetter`` over a torchvision ResNet returning layer4
  (keys ``backbone.conv1.weight``, ``backbone.layer1.0...``, as in ``fcn_resnet50``);
- ``classifier``: torchvision's ``FCNHead(in_channels, C)`` (3x3 conv -> BN -> ReLU ->
  Dropout(0.1) -> 1x1 conv), keys ``classifier.0.weight`` ...;
- ``projection``: 3x3 conv -> BN -> ReLU -> Dropout(0.1) -> 1x1 conv to 128 dims, used in
  training and acquisition only; its hidden width is ``in_channels // 4``, as FCNHead's.

Initial backbone weights: random (``model.backbone_weights = ""``), torchvision's ImageNet
weights (``"imagenet"``: the ResNet's weights enum, downloaded once into torchvision's
cache, ``torch.hub.get_dir()/checkpoints``; offline, a one-line error names the file), or
a local torchvision ResNet state dict (``model.backbone_checkpoint``), loaded strictly.

Output stride (a documented choice): every backbone runs at output stride 8 by default,
the ``fcn_resnet50`` geometry (``replace_stride_with_dilation=[False, True, True]``).
torchvision's ``BasicBlock`` (resnet18/34) refuses ``dilation > 1`` in its constructor,
so for those the same geometry is made after construction: the stride-2 convolutions
of layer3/layer4 (and their 1x1 downsample) get stride 1, and their 3x3 convolutions
dilation 2/4 with matching padding (the first block of a layer keeps the previous
dilation in its first conv, as torchvision does for Bottleneck). Stride 8 keeps about one
feature cell per superpixel at the presets' region sizes; ``output_stride=16`` or ``32``
(no dilation, the original FCN-32s) trade that for about 2x / 3x faster training
(resnet18 at 180x240 on 2 CPU cores: 2.6, 5.4, 7.2 images/s at stride 8, 16, 32).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, resnet18, resnet34, resnet50
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.segmentation.fcn import FCNHead

from gpual.config import BACKBONES, ModelConfig
from gpual.errors import GpualError

# ImageNet statistics: the torchvision backbones (and any checkpoint in their format) expect them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_STRIDES = (8, 16, 32)
# layer4 channels per backbone (FCNHead takes in_channels // 4 hidden channels).
_FEATURE_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
_CONSTRUCTORS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
_WEIGHTS = {"resnet18": ResNet18_Weights, "resnet34": ResNet34_Weights, "resnet50": ResNet50_Weights}


class ProjectionHead(nn.Sequential):
    """3x3 conv -> BN -> ReLU -> Dropout -> 1x1 conv: (B, in, h, w) -> (B, dim, h, w), not normalised."""

    def __init__(self, in_channels: int, dim: int, dropout: float) -> None:
        hidden = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Conv2d(hidden, dim, 1),
        )


class SegmentationModel(nn.Module):
    """FCN (``backbone`` + ``classifier``) with the contrastive ``projection`` head.

    ``forward(x)`` returns ``{"logits": (B, C, H, W), "embedding": (B, D, H, W)}``: both
    computed at the backbone's resolution, upsampled bilinearly (align_corners=False, as
    torchvision's FCN) to the input's H, W; the embedding is then L2-normalised over D.
    """

    def __init__(self, backbone: nn.Module, feature_channels: int, num_classes: int, embedding_dim: int,
                 projection_dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.backbone = backbone
        self.classifier = FCNHead(feature_channels, num_classes)
        self.projection = ProjectionHead(feature_channels, embedding_dim, projection_dropout)

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) normalised images -> (B, F, h, w) layer4 features (h = H / output stride)."""
        return self.backbone(x)["out"]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.features(x)
        logits = F.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)
        embedding = F.interpolate(self.projection(features), size=size, mode="bilinear", align_corners=False)
        return {"logits": logits, "embedding": F.normalize(embedding, p=2.0, dim=1)}

    def forward_projection(self, x: Tensor) -> dict[str, Tensor]:
        """``logits`` (B, C, H, W) as in :meth:`forward`, and ``projection`` (B, D, h, w), the
        projection head's output at the backbone's resolution, not normalised: what training
        and pool scoring read. ``embedding_at(projection, ...)`` (chosen pixels) and
        :class:`gpual.acquisition.pooling.RegionPooler` (region sums) give :meth:`forward`'s embedding
        without building the (B, D, H, W) map (the bulk of a CPU step)."""
        size = x.shape[-2:]
        features = self.features(x)
        logits = F.interpolate(self.classifier(features), size=size, mode="bilinear", align_corners=False)
        return {"logits": logits, "projection": self.projection(features)}

    def segment(self, x: Tensor) -> Tensor:
        """(B, C, H, W) logits only: inference without the projection head (evaluation)."""
        logits = self.classifier(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def dropout_modules(self) -> list[nn.Module]:
        """The classifier's Dropout layers: BALD switches only these to train mode (MC dropout)."""
        return [m for m in self.classifier.modules() if isinstance(m, nn.Dropout)]


def bilinear_source(dst: Tensor, n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where output coordinates ``dst`` (int tensor) read from along one axis of length
    ``n_in`` upsampled to ``n_out``: (lo, hi) int64 source indices and the float32 weight
    of ``hi`` (``lo`` gets 1 - weight), PyTorch's bilinear rule with align_corners=False:
    src = (dst + 0.5) * n_in / n_out - 0.5, clamped at 0; hi = min(lo + 1, n_in - 1).
    Same device as ``dst``."""
    src = ((dst.to(torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    return lo, hi, src - lo.to(torch.float32)


def embedding_at(embedding: Tensor, index: Tensor, size: tuple[int, int]) -> Tensor:
    """(n, D) L2-normalised embeddings of pixels ``index`` (flat into (B, H, W), int64).

    ``embedding`` (B, D, h, w) is a per-pixel map at any resolution: the values are those
    of ``F.interpolate(embedding, size, mode="bilinear", align_corners=False)`` at the
    pixels, re-normalised over D, i.e. exactly :meth:`SegmentationModel.forward`'s
    embedding when given ``forward_projection``'s projection (a plain gather when h, w = H, W).
    Differentiable with respect to ``embedding``.
    """
    b, d, h, w = embedding.shape
    height, width = size
    image, pixel = index // (height * width), index % (height * width)
    if (h, w) == (height, width):
        return F.normalize(embedding.reshape(b, d, h * w)[image, :, pixel].float(), p=2.0, dim=1)

    y0, y1, ly = bilinear_source(pixel // width, h, height)
    x0, x1, lx = bilinear_source(pixel % width, w, width)
    base = (image * (h * w)).unsqueeze(1)
    cells = base + torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=1)  # (n, 4)
    weights = torch.stack([(1 - ly) * (1 - lx), (1 - ly) * lx, ly * (1 - lx), ly * lx], dim=1)
    # A dense (n, B*h*w) interpolation matrix: the backward of a matmul sums in a fixed order,
    # while indexing's backward adds the (shared) neighbour cells atomically in any order,
    # which made CPU runs differ between processes.
    interp = torch.zeros(index.numel(), b * h * w, dtype=embedding.dtype, device=embedding.device)
    interp.scatter_add_(1, cells, weights.to(embedding.dtype))
    value = interp @ embedding.permute(0, 2, 3, 1).reshape(b * h * w, d)
    return F.normalize(value.float(), p=2.0, dim=1)


def build_model(config: ModelConfig, num_classes: int, output_stride: int = 8) -> SegmentationModel:
    """A new model for ``config.backbone``: heads freshly initialised, the backbone from
    ``config.backbone_checkpoint`` if set (a torchvision ResNet state dict file loaded
    strictly; ``fc.*`` keys, which an FCN drops, may be present or not; a file that does not
    fit raises GpualError naming it and the first mismatched keys), else from ImageNet with
    ``backbone_weights = "imagenet"`` (:func:`imagenet_state_dict`), else random.
    """
    if config.backbone not in BACKBONES:
        raise GpualError(f"model.backbone = {config.backbone!r} is not one of {', '.join(BACKBONES)}: fix it in gpual.toml", 2)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    resnet = _resnet(config.backbone, output_stride)
    if config.backbone_checkpoint:
        load_backbone_checkpoint(resnet, Path(config.backbone_checkpoint).expanduser(), config.backbone)
    elif config.backbone_weights == "imagenet":
        resnet.load_state_dict(imagenet_state_dict(config.backbone))
    elif config.backbone_weights:
        raise GpualError(f"model.backbone_weights = {config.backbone_weights!r} is not \"\" or \"imagenet\": fix it in gpual.toml", 2)
    backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
    return SegmentationModel(
        backbone, _FEATURE_CHANNELS[config.backbone], num_classes, config.projection_dim, config.projection_dropout
    )


def imagenet_state_dict(backbone: str) -> dict[str, Tensor]:
    """torchvision's ImageNet weights for ``backbone`` (its weights enum's DEFAULT) through
    torchvision's own download and cache (``torch.hub.get_dir()/checkpoints``).

    Refuses weights whose input normalisation is not :func:`normalize`'s, and turns a
    failed download into one line naming the cache file and the local-file option.
    """
    weights = _WEIGHTS[backbone].DEFAULT
    preset = weights.transforms()
    if tuple(preset.mean) != IMAGENET_MEAN or tuple(preset.std) != IMAGENET_STD:
        raise GpualError(f"{weights} expects another input normalisation than gpual's ImageNet mean/std")
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; a bad hash a RuntimeError
        raise GpualError(
            f"cannot get the ImageNet weights of {backbone} ({type(exc).__name__}: {exc}): put {weights.url} at {cache}, "
            "or set model.backbone_checkpoint to a local copy of a torchvision ResNet state dict"
        ) from None


def _resnet(name: str, output_stride: int) -> ResNet:
    dilate = {8: [False, True, True], 16: [False, False, True], 32: [False, False, False]}[output_stride]
    if name == "resnet50":
        return resnet50(weights=None, replace_stride_with_dilation=dilate)
    resnet = _CONSTRUCTORS[name](weights=None)
    dilation = 1
    for layer, use in zip((resnet.layer2, resnet.layer3, resnet.layer4), dilate):
        if use:
            _dilate_basic_layer(layer, previous=dilation, dilation=dilation * 2)
            dilation *= 2
    return resnet


def _dilate_basic_layer(layer: nn.Sequential, previous: int, dilation: int) -> None:
    """Turn a stride-2 layer of BasicBlocks into a stride-1 layer with dilated 3x3 convs.

    Conv2d reads stride/dilation/padding at call time, so changing the attributes is
    enough; weight shapes (and so state-dict compatibility) are unchanged.
    """
    for i, block in enumerate(layer):
        assert isinstance(block, BasicBlock)
        first = previous if i == 0 else dilation
        block.conv1.stride, block.conv1.dilation, block.conv1.padding = (1, 1), (first, first), (first, first)
        block.conv2.dilation, block.conv2.padding = (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def load_backbone_checkpoint(resnet: ResNet, path: Path, backbone: str) -> None:
    """Load a torchvision ResNet state dict from ``path`` into ``resnet`` strictly (``fc.*`` optional)."""
    if not path.is_file():
        raise GpualError(f"backbone checkpoint {path} not found: fix model.backbone_checkpoint in gpual.toml or set it to \"\"")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike
        raise GpualError(
            f"backbone checkpoint {path} is not a readable torch state dict ({type(exc).__name__}): "
            "save one with torch.save(resnet.state_dict(), path)"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GpualError(f"backbone checkpoint {path} is not a state dict of tensors: save one with torch.save(resnet.state_dict(), path)")
    expected = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    given = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in given and given[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append(f"shape {'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
        raise GpualError(
            f"backbone checkpoint {path} does not fit a torchvision {backbone} ({'; '.join(parts)}): "
            f"give a {backbone} state dict or change model.backbone"
        )
    resnet.load_state_dict(given, strict=False)  # fc.* is the only part left out, checked above


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) float32 on ``device``, made once per device: a
    new tensor from host values is a blocking copy to a CUDA device, a sync every step."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def normalize(images: Tensor) -> Tensor:
    """uint8 images (B, H, W, 3) or (B, 3, H, W) -> (B, 3, H, W) float32 with ImageNet mean/std,
    on ``images``' device. A last axis of size 3 means channels-last."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"normalize expects uint8 (B, H, W, 3) or (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    elif images.shape[1] != 3:
        raise ValueError(f"normalize expects 3 colour channels, got shape {tuple(images.shape)}")
    mean, std = _mean_std(images.device)
    x = images.float().div_(255.0)
    return ((x - mean) / std).contiguous()
