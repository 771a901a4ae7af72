"""Config defaults, presets, TOML round trip and validation."""
from __future__ import annotations

import pytest

from gpual.config import Config, dump_config, load_config, make_config, parse_settings, preset_names
from gpual.errors import GpualError


def test_defaults_follow_method_md() -> None:
    c = Config()
    assert (c.contrastive.weight, c.contrastive.temperature) == (0.1, 0.1)
    assert (c.contrastive.anchors_hard, c.contrastive.anchors_random) == (25, 25)
    assert (c.contrastive.negatives_hard, c.contrastive.negatives_random) == (512, 512)
    assert (c.contrastive.bank_size, c.contrastive.bank_pixels_per_image) == (1000, 10)
    assert (c.train.lr, c.train.weight_decay, c.train.ema_decay) == (5e-4, 2e-4, 0.99)
    assert (c.umap.n_components, c.umap.n_neighbors, c.umap.min_dist) == (2, 15, 0.1)
    assert c.superpixels.method == "slic" and c.superpixels.region_pixels == 400
    assert c.acquisition.strategy == "umap-kmeans-entropy" and c.acquisition.region_score == "sum"
    assert c.model.backbone == "resnet50" and c.train.reinit_each_round is False


def test_toml_round_trip(tmp_path) -> None:
    config = make_config("cpu-small", {"data": {"root": "/data", "dataset": "segnet"}})
    path = tmp_path / "gpual.toml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert config.model.backbone == "resnet18" and config.data.scale == 0.5
    # "auto" loader processes (none on the CPU) everywhere but the demo's few small images.
    assert config.train.num_workers == "auto" and make_config("paper").train.num_workers == "auto"
    assert make_config("demo").train.num_workers == 0
    # Resident training data: "auto" by default, true / false kept as booleans.
    assert config.train.resident == "auto" and all(make_config(p).train.resident == "auto" for p in preset_names())
    for value in (True, False):
        path.write_text(dump_config(make_config("demo", {"train": {"resident": value}})))
        assert load_config(path).train.resident is value


def test_presets_are_shipped() -> None:
    assert {"paper", "cpu-small", "demo"} <= set(preset_names())
    with pytest.raises(GpualError, match="unknown preset 'nope'"):
        make_config("nope")


def test_partial_file_takes_defaults(tmp_path) -> None:
    path = tmp_path / "gpual.toml"
    path.write_text('[train]\nlr = 1\n')
    config = load_config(path)
    assert config.train.lr == 1.0 and config.train.batch_size == Config().train.batch_size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nlearning_rate = 1\n", "unknown key"),
        ("[train]\nbatch_size = 'five'\n", "must be int"),
        ("[acquisition]\nstrategy = 'best'\n", "acquisition.strategy"),
        ("[acquisition]\nbudget = 0\n", "must be positive"),
        ("[umap]\nn_neighbors = 1\n", "umap.n_neighbors = 1 must be at least 2"),
        ("[kmeans]\nn_init = 0\n", "kmeans.n_init = 0 must be at least 1"),
        ("[kmeans]\ninit = 'grid'\n", "kmeans.init = 'grid' is not one of default, k-means"),
        ("[kmeans]\ntol = -1.0\n", "kmeans.tol = -1.0 must not be negative"),
        ("[kmeans]\nlevels = 3\n", 'kmeans.levels = 3 is not 1, 2 or "auto"'),
        ("[kmeans]\nlevels = true\n", 'kmeans.levels = True is not 1, 2 or "auto"'),
        ("[kmeans]\nlevels = 'two'\n", "kmeans.levels = 'two' is not 1, 2 or"),
        ("[umap]\ninit = 'pca'\n", "umap.init = 'pca' is not one of random, spectral"),
        ("[train]\nnum_workers = -1\n", 'train.num_workers = -1 is not a count >= 0 or "auto"'),
        ("[train]\nnum_workers = 'many'\n", "train.num_workers = 'many' is not a count"),
        ("[train]\nnum_workers = false\n", "train.num_workers = False is not a count"),
        ("[train]\nresident = 'yes'\n", "train.resident = 'yes' is not true, false or \"auto\": fix it in gpual.toml"),
        ("[train]\nresident = 1\n", "train.resident = 1 is not true, false or"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, text: str, message: str) -> None:
    path = tmp_path / "gpual.toml"
    path.write_text(text)
    with pytest.raises(GpualError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_parse_settings_reads_toml_values_into_nested_tables() -> None:
    settings = parse_settings(["acquisition.region_score=mean", "kmeans.max_iter=50", "train.amp=true",
                               "data.scale=0.5", 'superpixels.method="seeds"'])
    assert settings == {"acquisition": {"region_score": "mean"}, "kmeans": {"max_iter": 50}, "train": {"amp": True},
                        "data": {"scale": 0.5}, "superpixels": {"method": "seeds"}}
    assert make_config("demo", settings).kmeans.max_iter == 50
    for bad in ("budget", "=3", "acquisition..budget=3"):
        with pytest.raises(GpualError, match="is not KEY=VALUE"):
            parse_settings([bad])
    with pytest.raises(GpualError, match="already given a value"):
        parse_settings(["kmeans=1", "kmeans.max_iter=50"])


@pytest.mark.parametrize("preset", [None, *preset_names()])
def test_dumped_config_is_commented_and_loads_back_equal(tmp_path, preset: str | None) -> None:
    import dataclasses
    import tomllib

    import tomli_w

    # A root with characters TOML must escape, and every preset's values.
    config = make_config(preset, {"data": {"root": '/data/my "scenes" #1 \\ été', "dataset": "folder"}})
    text = dump_config(config)
    path = tmp_path / "gpual.toml"
    path.write_text(text)
    assert load_config(path) == config
    assert tomllib.loads(text) == config.to_dict()
    lines = text.splitlines()
    assert lines[0].startswith("# The configuration of this gpual workspace")
    header = " ".join(lines[:5])
    assert all(line.startswith("# ") for line in lines[:5])
    assert "gpual/config.py" in header and "docs/method.md" in header and 'README.md, section "Configuration"' in header
    for section in dataclasses.fields(config):
        table = getattr(config, section.name)
        at = lines.index(f"[{section.name}]")
        assert lines[at - 1] == f"# {type(table).__doc__.strip().splitlines()[0].replace('``', '`')}"
        for item in dataclasses.fields(table):
            doc = item.metadata.get("doc")
            assert doc, f"{section.name}.{item.name} has no doc for gpual.toml"
            n = next(n for n, line in enumerate(lines) if line.startswith(f"{item.name} = ") and n > at)
            # The note on the line above; the key's line is the assignment alone.
            assert lines[n - 1] == f"# {doc}", lines[n]
            assert lines[n] == tomli_w.dumps({item.name: getattr(table, item.name)}).rstrip("\n")
