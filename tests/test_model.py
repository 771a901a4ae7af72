"""The FCN + projection head: torchvision layout, shapes, normalisation, output stride,
backbone checkpoints, MC dropout, and embedding_at = forward's embedding."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from gpual.config import ModelConfig
from gpual.errors import GpualError
from gpual.model import IMAGENET_MEAN, IMAGENET_STD, build_model, embedding_at, normalize


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_resnet50_matches_torchvision_fcn_resnet50() -> None:
    torch.manual_seed(0)
    ref = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, aux_loss=False, num_classes=5)
    model = build_model(ModelConfig(backbone="resnet50"), num_classes=5)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("projection.")}
    assert ours.keys() == ref.state_dict().keys()
    assert all(ours[k].shape == v.shape for k, v in ref.state_dict().items())
    model.load_state_dict(ref.state_dict(), strict=False)
    ref.eval(), model.eval()
    x = normalize(_images(1, 64, 80))
    with torch.no_grad():
        expected = ref(x)["out"]
        out = model(x)
        assert torch.allclose(out["logits"], expected, atol=1e-5)
        assert torch.allclose(model.segment(x), expected, atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
def test_small_backbones_shapes_and_output_stride(backbone: str) -> None:
    model = build_model(ModelConfig(backbone=backbone, projection_dim=16), num_classes=3)
    assert model.num_classes == 3 and model.embedding_dim == 16
    x = normalize(_images(2, 48, 64))
    assert model.features(x).shape == (2, 512, 6, 8)  # output stride 8, as fcn_resnet50
    out = model(x)
    assert out["logits"].shape == (2, 3, 48, 64) and out["embedding"].shape == (2, 16, 48, 64)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(2, 48, 64), atol=1e-5)
    assert build_model(ModelConfig(backbone=backbone), 3, output_stride=32).features(x).shape == (2, 512, 2, 2)
    assert build_model(ModelConfig(backbone=backbone), 3, output_stride=16).features(x).shape == (2, 512, 3, 4)
    with pytest.raises(ValueError):
        build_model(ModelConfig(backbone=backbone), 3, output_stride=4)


def test_embedding_at_equals_forward_embedding() -> None:
    model = build_model(ModelConfig(backbone="resnet18", projection_dim=8), num_classes=3).eval()
    x = normalize(_images(2, 40, 56, seed=1))
    with torch.no_grad():
        full = model(x)["embedding"]
        train = model.forward_projection(x)
    index = torch.randint(0, 2 * 40 * 56, (300,), generator=torch.Generator().manual_seed(0))
    expected = full.permute(0, 2, 3, 1).reshape(-1, 8)[index]
    assert torch.allclose(embedding_at(train["projection"], index, (40, 56)), expected, atol=1e-5)
    assert torch.allclose(train["logits"], model(x)["logits"])
    # A full-resolution map is sampled exactly at the pixel (identity).
    assert torch.allclose(embedding_at(full, index, (40, 56)), expected, atol=1e-6)


def test_normalize_layouts_and_values() -> None:
    images = _images(2, 5, 7)
    a = normalize(images)
    b = normalize(images.permute(0, 3, 1, 2))
    assert a.shape == (2, 3, 5, 7) and a.dtype == torch.float32 and torch.equal(a, b)
    pixel = images[1, 2, 3].float() / 255
    expected = (pixel - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(a[1, :, 2, 3], expected, atol=1e-6)
    with pytest.raises(ValueError):
        normalize(images.float())
    with pytest.raises(ValueError):
        normalize(torch.zeros(1, 4, 5, 5, dtype=torch.uint8))


def test_mc_dropout_modules_are_the_classifiers() -> None:
    model = build_model(ModelConfig(backbone="resnet18"), num_classes=4).eval()
    dropouts = model.dropout_modules()
    assert len(dropouts) == 1 and dropouts[0] is model.classifier[3] and isinstance(dropouts[0], torch.nn.Dropout)
    x = normalize(_images(1, 32, 32))
    with torch.no_grad():
        base = model(x)["logits"]
        assert torch.equal(base, model(x)["logits"])
        for m in dropouts:
            m.train()
        torch.manual_seed(0)
        assert not torch.allclose(base, model(x)["logits"])


def test_backbone_checkpoint_loads_strictly(tmp_path: Path) -> None:
    resnet = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "r18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model(ModelConfig(backbone="resnet18", backbone_checkpoint=str(path)), num_classes=3)
    assert torch.equal(model.backbone.conv1.weight, resnet.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, resnet.layer4[1].conv2.weight)
    trunk = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    torch.save(trunk, path)  # without fc.* is fine too
    build_model(ModelConfig(backbone="resnet18", backbone_checkpoint=str(path)), num_classes=3)


def test_backbone_checkpoint_mismatch_names_file_and_keys(tmp_path: Path) -> None:
    wrong = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(GpualError, match=r"r34\.pth does not fit a torchvision resnet18.*unexpected layer1\.2\."):
        build_model(ModelConfig(backbone="resnet18", backbone_checkpoint=str(wrong)), num_classes=3)
    wide = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wide)
    with pytest.raises(GpualError, match=r"r50\.pth does not fit.*unexpected layer1\.0\.conv3\.weight.*shape layer1\.0\.conv1\.weight"):
        build_model(ModelConfig(backbone="resnet18", backbone_checkpoint=str(wide)), num_classes=3)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(GpualError, match="junk.pth is not a readable"):
        build_model(ModelConfig(backbone="resnet18", backbone_checkpoint=str(junk)), num_classes=3)
    with pytest.raises(GpualError, match="not found"):
        build_model(ModelConfig(backbone="resnet18", backbone_checkpoint=str(tmp_path / "none.pth")), num_classes=3)



def test_imagenet_weights_come_from_torchvisions_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backbone_weights = "imagenet" loads the ResNet's DEFAULT weights through torchvision's
    own cache (a locally written state dict stands for the download, which no test makes);
    a missing file offline is one line naming the cache path and the local-file option."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    assert cache.parent.parent == tmp_path / "torch" / "hub"
    with pytest.raises(GpualError, match=rf"ImageNet weights of resnet18.*put {weights.url} at {cache}.*backbone_checkpoint"):
        build_model(ModelConfig(backbone="resnet18", backbone_weights="imagenet"), num_classes=3)
    torch.manual_seed(1)
    pretrained = torchvision.models.resnet18(weights=None)
    cache.parent.mkdir(parents=True, exist_ok=True)  # the failed download made the folder
    torch.save(pretrained.state_dict(), cache)
    model = build_model(ModelConfig(backbone="resnet18", backbone_weights="imagenet"), num_classes=3)
    assert torch.equal(model.backbone.conv1.weight, pretrained.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, pretrained.layer4[1].bn2.running_var)
    # The weights' own preprocessing is the network's input normalisation.
    assert tuple(weights.transforms().mean) == IMAGENET_MEAN and tuple(weights.transforms().std) == IMAGENET_STD
    # A local checkpoint wins over the download; no weights is random initialisation.
    fresh = build_model(ModelConfig(backbone="resnet18"), num_classes=3)
    assert not torch.equal(fresh.backbone.conv1.weight, pretrained.conv1.weight)
    with pytest.raises(GpualError, match="backbone_weights"):
        build_model(ModelConfig(backbone="resnet18", backbone_weights="coco"), num_classes=3)


def test_checkpoint_meta_never_downloads_again() -> None:
    """A trained model's meta drops backbone_weights: loading it reads the checkpoint only."""
    from gpual.config import make_config
    from gpual.training.checkpoints import model_meta

    config = make_config("paper")
    assert config.model.backbone_weights == "imagenet"
    meta = model_meta(config, 3, ["a", "b", "c"])
    assert meta["model"]["backbone_weights"] == "" and meta["model"]["backbone_checkpoint"] == ""
