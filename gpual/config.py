"""Workspace configuration: every default of the method (docs/method.md), stored as TOML.

A workspace holds one ``gpual.toml``. Presets (``gpual/presets/*.toml``) are partial TOML
files laid over these defaults; they are data, not code branches.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_origin, get_type_hints

import tomli_w

from gpual.errors import GpualError

DATASET_KINDS = ("camvid", "segnet", "cityscapes", "folder")
SUPERPIXEL_METHODS = ("slic", "seeds")
BACKBONES = ("resnet18", "resnet34", "resnet50")
# model.backbone_weights: "" = random initialisation; "imagenet" = torchvision's ImageNet
# weights of the chosen ResNet (its weights enum's DEFAULT), through torchvision's cache.
BACKBONE_WEIGHTS = ("", "imagenet")
STRATEGIES = (
    "umap-kmeans-entropy",
    "kmeans-entropy",
    "entropy",
    "margin",
    "least-confidence",
    "bald",
    "coreset",
    "random",
)
ORACLES = ("pixel", "dominant")
# How a region's pixel entropies become its score (acquisition.region_score): "sum" = H(S)
# (the paper's Eq. 6; grows with the region's size, so it buys large regions), "mean" =
# H(S) / pixels (entropy per labelled pixel), "sqrt" = H(S) / sqrt(pixels): between the
# two, entropy per unit of a region's outline (a region's boundary, which an annotator
# traces, grows as the square root of its area).
REGION_SCORES = ("sum", "mean", "sqrt")
# acquisition.budget_unit: "regions" = acquisition.budget regions a round; "pixels" = regions
# in rank order until acquisition.budget_pixels of the pool's pixels are labelled.
BUDGET_UNITS = ("regions", "pixels")
# "default": the library's own initialisation (cuML: scalable k-means++, i.e. k-means||;
# scikit-learn: greedy k-means++); "random" draws k points, the cheapest for large k.
KMEANS_INITS = ("default", "k-means++", "random")
KMEANS_LEVELS = (1, 2, "auto")
# UMAP's initial layout, an argument both libraries take. "spectral" (their default)
# solves an eigenproblem that is near-degenerate on memory banks with duplicate vectors:
# umap-learn then gives different layouts for the same inputs and seed (seen on CamVid
# and the demo); "random" draws from random_state, so a selection can be repeated.
UMAP_INITS = ("random", "spectral")


def _key(default: Any, doc: str) -> Any:
    """A config field with its one-line meaning (units included), which :func:`dump_config`
    writes on the line above the key in gpual.toml."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: str = _key("", "dataset root folder")
    dataset: str = _key("camvid", "folder layout: camvid, segnet, cityscapes or folder (see README.md)")
    pool_split: str = _key("train", "split whose images form the pool that active learning labels")
    val_split: str = _key("val", "split `gpual evaluate --split val` reads")
    test_split: str = _key("test", "split `gpual evaluate --split test` reads")
    # Working resolution as a factor of the stored images; superpixels, training,
    # acquisition and evaluation all run at this one resolution.
    scale: float = _key(1.0, "working resolution, a factor of the files' size (0.5 = half width and height)")


@dataclass
class SuperpixelConfig:
    """Superpixel precomputation (docs/method.md: about 400 px per region by default)."""

    method: str = _key("slic", "slic (fast-slic) or seeds (OpenCV's SEEDS)")
    region_pixels: int = _key(400, "target pixels per superpixel at the working scale")
    compactness: float = _key(10.0, "SLIC compactness: higher gives rounder regions that follow edges less")
    # SEEDS block levels: 3 gives ~430 regions on a 360x480 CamVid frame (4 gives ~300).
    seeds_levels: int = _key(3, "SEEDS block levels")
    seeds_iterations: int = _key(4, "SEEDS iterations")
    workers: int = _key(2, "processes computing maps in parallel (`gpual superpixels --workers` overrides)")


@dataclass
class ModelConfig:
    """FCN in torchvision's ``fcn_resnet50`` layout plus the projection head."""

    backbone: str = _key("resnet50", "resnet18, resnet34 or resnet50")
    # one of BACKBONE_WEIGHTS; the paper preset uses "imagenet"
    backbone_weights: str = _key("", '"" = random initialisation, "imagenet" = torchvision\'s ImageNet weights')
    backbone_checkpoint: str = _key("", "path of a local torchvision ResNet state dict (overrides backbone_weights)")
    projection_dim: int = _key(128, "channels of the projection head's pixel embeddings")
    projection_dropout: float = _key(0.1, "dropout rate inside the projection head")


@dataclass
class TrainConfig:
    """Optimiser and schedule (paper section 4.2)."""

    batch_size: int = _key(5, "images per training step")
    epochs_per_round: int = _key(20, "epochs of each round's training")
    final_epochs: int = _key(60, "epochs of the final retraining and of the full-supervision reference")
    lr: float = _key(5e-4, "Adam learning rate")
    weight_decay: float = _key(2e-4, "Adam weight decay")
    beta1: float = _key(0.9, "Adam beta1")
    beta2: float = _key(0.999, "Adam beta2")
    hflip: bool = _key(True, "random horizontal flips of the training images")
    amp: bool = _key(True, "mixed precision: bfloat16 where the GPU has it, else float16 with loss scaling (CUDA only)")
    ema_decay: float = _key(0.99, "the teacher's EMA decay per step, in [0, 1]")
    reinit_each_round: bool = _key(False, "start each round from fresh weights instead of the previous round's")
    # Loader processes decoding images and superpixel maps. "auto": none on the CPU (the
    # model's compute has the cores), min(8, usable cores - 1) with CUDA, where loading
    # overlaps the device (CamVid pool on a 16-core H200 box: host wait 0.98 s with 0, 0.36 s with 8).
    num_workers: int | str = _key("auto", 'loader processes, or "auto" (none on the CPU, up to 8 with CUDA)')
    # Resident training data (TrainingBatches, gpual/training/data.py): decode every training
    # image once per run and keep images and targets (H x W x 4 bytes each) on the model's
    # device, forming each epoch's batches there, instead of decoding them every epoch. Batches
    # and their order are the same either way. "auto": resident when the decoded set fits in a
    # quarter of the device's free memory (CUDA: torch.cuda.mem_get_info; CPU: free physical
    # memory); true: resident (an error if the set exceeds the free memory); false: streamed.
    resident: bool | str = _key("auto", 'decode the training images once and keep them on the device: "auto", true or false')
    seed: int = _key(0, "seed of the initial weights, shuffles, flips, dropout and contrastive sampling")


@dataclass
class ContrastiveConfig:
    """InfoNCE with a per-class memory bank (paper section 3.2)."""

    # lambda in L = L_CE + lambda * L_NCE; 0 is the no-contrastive ablation
    weight: float = _key(0.1, "lambda in L = L_CE + lambda * L_NCE (0 = no contrastive term)")
    temperature: float = _key(0.1, "InfoNCE temperature")
    anchors_hard: int = _key(25, "misclassified anchor pixels per class and batch")
    anchors_random: int = _key(25, "further anchor pixels per class and batch, drawn at random")
    negatives_hard: int = _key(512, "negatives per anchor most similar to it, from the other classes' banks")
    negatives_random: int = _key(512, "further negatives per anchor, drawn at random")
    bank_size: int = _key(1000, "memory bank vectors per class (P_t)")
    bank_pixels_per_image: int = _key(10, "correctly classified pixels per class and image pushed into the bank (P_i)")


@dataclass
class AcquisitionConfig:
    """One acquisition round: budgets (in superpixels, or in pixels), strategy, oracle."""

    strategy: str = _key("umap-kmeans-entropy", "selection strategy of rounds 1 and later (round 0 is random)")
    init_budget: int = _key(1600, "regions (superpixels) drawn at random in round 0")
    budget: int = _key(1600, 'regions (superpixels) selected per round after round 0 (budget_unit = "regions")')
    region_score: str = _key("sum", "how pixel entropies become a region's score: sum, mean or sqrt")  # REGION_SCORES
    # "regions": `budget` regions per round after round 0. "pixels": each round labels
    # `budget_pixels` of the pool's pixels (a share; regions taken in rank order until the
    # next one would pass it), whatever the regions' sizes, for every strategy; `budget` is
    # then not read (KMeans' k is the share converted to regions with the candidates' mean
    # size). Round 0 stays `init_budget` regions.
    budget_unit: str = _key("regions", '"regions" (budget) or "pixels" (budget_pixels) per round after round 0')
    budget_pixels: float = _key(0.01, 'share of the pool\'s pixels per round with budget_unit = "pixels" (0.01 = 1%)')
    # Class-balanced weighting (after Cai et al., CVPR 2021): a region's score times
    # exp(-class_balance * f_c), f_c the share of the labelled pixels whose class is the
    # region's dominant predicted class c. 0 = off; 1 = their exp(-p) weight.
    class_balance: float = _key(0.0, "class-balanced score weighting exp(-class_balance * f_c); 0 = off")
    # Clustering strategies: KMeans into ceil(clusters_per_budget x budget) clusters, and
    # the ranking takes each cluster's best region, then each one's second best, and so on
    # (1.0 = one region per cluster, the method). In (0, 1].
    clusters_per_budget: float = _key(1.0, "KMeans clusters per budgeted region, in (0, 1] (1 = one region per cluster)")
    oracle: str = _key("pixel", "simulated oracle (`gpual label`): pixel (ground truth per pixel) or dominant (one class)")
    batch_size: int = _key(8, "images per forward batch when scoring the pool (and in evaluation)")
    mc_passes: int = _key(10, "MC-dropout passes of the bald strategy")
    overlays: int = _key(8, "overlay PNGs per round (rounds/NNN/overlays/, the most-queried images)")
    seed: int = _key(0, "seed of the random strategy's draw and of MC dropout (varied per round)")


@dataclass
class UmapConfig:
    """UMAP fitted on the memory bank; same arguments for cuML and umap-learn."""

    n_components: int = _key(2, "dimensions of the reduced embedding")
    n_neighbors: int = _key(15, "UMAP n_neighbors (at least 2)")
    min_dist: float = _key(0.1, "UMAP min_dist")
    random_state: int = _key(0, "UMAP seed")
    init: str = _key("random", "initial layout: random or spectral")  # one of UMAP_INITS


@dataclass
class KMeansConfig:
    """KMeans on the reduced region embeddings, k = the round's budget."""

    max_iter: int = _key(300, "iterations per run at most")
    n_init: int = _key(1, "runs with different initial centres (the best is kept)")
    random_state: int = _key(0, "KMeans seed")
    init: str = _key("default", "initial centres: default (the library's own), k-means++ or random")  # KMEANS_INITS
    # Convergence tolerance as each library defines it (scikit-learn: centre movement
    # relative to the data's variance; cuML: relative change of the inertia); 1e-4 is both defaults.
    tol: float = _key(1e-4, "convergence tolerance, as each library defines it")
    # 1: one KMeans with k = the budget (the method). 2: KMeans into about sqrt(k) groups,
    # then each group into its share of the k clusters (in proportion to its regions, at
    # least one): an approximation of the flat clustering whose cost grows with
    # n * sqrt(k) instead of n * k, for pools of millions of regions. "auto": one level
    # while regions x k <= gpual.acquisition.clustering.TWO_LEVELS_ABOVE (1e9: a CamVid pool, 160k x
    # 1.6k, stays one level), two levels above (1M regions at a 1% budget, Cityscapes' 4M).
    levels: int | str = _key("auto", '1 (flat), 2 (two-level, for millions of regions) or "auto"')


@dataclass
class Config:
    """The whole workspace configuration, one section per pipeline stage."""

    data: DataConfig = field(default_factory=DataConfig)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    umap: UmapConfig = field(default_factory=UmapConfig)
    kmeans: KMeansConfig = field(default_factory=KMeansConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Check the values that have a fixed set of choices or a range; return self."""
        _choice("data.dataset", self.data.dataset, DATASET_KINDS)
        _choice("superpixels.method", self.superpixels.method, SUPERPIXEL_METHODS)
        _choice("model.backbone", self.model.backbone, BACKBONES)
        _choice("model.backbone_weights", self.model.backbone_weights, BACKBONE_WEIGHTS)
        _choice("acquisition.strategy", self.acquisition.strategy, STRATEGIES)
        _choice("acquisition.oracle", self.acquisition.oracle, ORACLES)
        _choice("acquisition.region_score", self.acquisition.region_score, REGION_SCORES)
        _choice("acquisition.budget_unit", self.acquisition.budget_unit, BUDGET_UNITS)
        if not 0.0 < self.acquisition.budget_pixels <= 1.0:
            raise GpualError(f"config acquisition.budget_pixels = {self.acquisition.budget_pixels} is a share of the pool's "
                             "pixels: it must lie in (0, 1] (0.01 = 1%); fix it in gpual.toml", 2)
        if self.acquisition.class_balance < 0.0:
            raise GpualError(f"config acquisition.class_balance = {self.acquisition.class_balance} must not be negative "
                             "(0 = off): fix it in gpual.toml", 2)
        if not 0.0 < self.acquisition.clusters_per_budget <= 1.0:
            raise GpualError(f"config acquisition.clusters_per_budget = {self.acquisition.clusters_per_budget} must lie in "
                             "(0, 1] (1 = one region per cluster): fix it in gpual.toml", 2)
        _choice("kmeans.init", self.kmeans.init, KMEANS_INITS)
        _choice("umap.init", self.umap.init, UMAP_INITS)
        positives = {
            "data.scale": self.data.scale,
            "superpixels.region_pixels": self.superpixels.region_pixels,
            "superpixels.workers": self.superpixels.workers,
            "train.batch_size": self.train.batch_size,
            "acquisition.batch_size": self.acquisition.batch_size,
            "acquisition.init_budget": self.acquisition.init_budget,
            "acquisition.budget": self.acquisition.budget,
            "contrastive.bank_size": self.contrastive.bank_size,
            "umap.n_components": self.umap.n_components,
        }
        for key, value in positives.items():
            if value <= 0:
                raise GpualError(f"config {key} = {value} must be positive: fix it in gpual.toml", 2)
        at_least = {
            "umap.n_neighbors": (self.umap.n_neighbors, 2),
            "kmeans.max_iter": (self.kmeans.max_iter, 1),
            "kmeans.n_init": (self.kmeans.n_init, 1),
            "superpixels.seeds_levels": (self.superpixels.seeds_levels, 1),
            "superpixels.seeds_iterations": (self.superpixels.seeds_iterations, 1),
        }
        for key, (value, low) in at_least.items():
            if value < low:
                raise GpualError(f"config {key} = {value} must be at least {low}: fix it in gpual.toml", 2)
        if isinstance(self.kmeans.levels, bool) or self.kmeans.levels not in KMEANS_LEVELS:
            raise GpualError(f"config kmeans.levels = {self.kmeans.levels!r} is not 1, 2 or \"auto\": fix it in gpual.toml", 2)
        workers = self.train.num_workers
        if isinstance(workers, bool) or (workers != "auto" and not (isinstance(workers, int) and workers >= 0)):
            raise GpualError(f"config train.num_workers = {workers!r} is not a count >= 0 or \"auto\": fix it in gpual.toml", 2)
        resident = self.train.resident
        if not (isinstance(resident, bool) or resident == "auto"):
            raise GpualError(f"config train.resident = {resident!r} is not true, false or \"auto\": fix it in gpual.toml", 2)
        if self.kmeans.tol < 0:
            raise GpualError(f"config kmeans.tol = {self.kmeans.tol} must not be negative: fix it in gpual.toml", 2)
        if not 0.0 <= self.train.ema_decay <= 1.0:
            raise GpualError("config train.ema_decay must lie in [0, 1]: fix it in gpual.toml", 2)
        return self


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GpualError(f"config {key} = {value!r} is not one of {', '.join(allowed)}: fix it in gpual.toml", 2)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Construct dataclass ``cls`` from a TOML table, refusing unknown keys and wrong types."""
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GpualError(f"{where or 'config'}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", 2)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        hint = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise GpualError(f"{key} must be a table, got {type(value).__name__}", 2)
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _coerce(key, hint, value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    if get_origin(hint) is not None:  # no generic fields today; keep the value as TOML gave it
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise GpualError(f"config {key} must be {hint.__name__}, got {value!r}", 2)
    return value


def merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on it, table by table (neither is changed)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = value
    return out


def preset_names() -> list[str]:
    """Names of the presets shipped in ``gpual/presets``."""
    return sorted(p.name[:-5] for p in resources.files("gpual.presets").iterdir() if p.name.endswith(".toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The partial TOML table of preset ``name``."""
    path = resources.files("gpual.presets") / f"{name}.toml"
    if not path.is_file():
        raise GpualError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}", 2)
    return tomllib.loads(path.read_text())


def make_config(preset: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset's table, then ``overrides`` (nested dicts), validated."""
    values = Config().to_dict()
    if preset:
        values = merge_tables(values, load_preset(preset))
    if overrides:
        values = merge_tables(values, overrides)
    return _build(Config, values, "").validate()


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """Nested overrides from ``KEY=VALUE`` strings such as ``acquisition.region_score=mean``.

    VALUE is read as a TOML value (``3``, ``0.5``, ``true``, ``"x"``); anything that is not
    one is taken as a bare string. Unknown keys are refused later, by ``make_config``.
    """
    out: dict[str, Any] = {}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise GpualError(f"--set {setting!r} is not KEY=VALUE: write e.g. --set acquisition.region_score=mean", 2)
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        table = out
        for part in parts[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise GpualError(f"--set {setting!r}: {part} was already given a value", 2)
        table[parts[-1]] = value
    return out


def load_config(path: Path) -> Config:
    """Read a workspace's ``gpual.toml``; missing keys take the defaults."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise GpualError(f"{path} not found: run `gpual init` to create the workspace") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GpualError(f"{path} is not valid TOML ({exc}): fix that line of the file", 2) from None
    return _build(Config, merge_tables(Config().to_dict(), values), "").validate()


CONFIG_HEADER = """\
# The configuration of this gpual workspace, read by every gpual command: one table per
# pipeline stage. Edit a value here (or pass --set TABLE.KEY=VALUE to `gpual init`); a key
# left out takes its default. Documented in the gpual repository: every key, its default
# and its meaning in gpual/config.py (one dataclass per table); what each stage does with
# it in docs/method.md; an overview in README.md, section "Configuration".
"""


def dump_config(config: Config) -> str:
    """The TOML text of ``config``, every key written out: a header saying what the file
    is and where its keys are documented, each table's dataclass docstring above it and
    each key's note (its field's ``doc``) on the line above the key. :func:`load_config` reads
    it back to an equal config (comments are not values)."""
    parts = [CONFIG_HEADER]
    for section in dataclasses.fields(config):
        table = getattr(config, section.name)
        lines = ["", f"# {_first_line(type(table).__doc__)}", f"[{section.name}]"]
        for item in dataclasses.fields(table):
            assignment = tomli_w.dumps({item.name: getattr(table, item.name)}).rstrip("\n")
            note = item.metadata.get("doc", "")
            # Above the key, not beside it: a line `key = value` stays exactly that, for
            # whoever edits the file by lines (sed, a script's str.replace).
            lines.extend((f"# {note}", assignment) if note else (assignment,))
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def _first_line(doc: str | None) -> str:
    """A docstring's first line, with reST's double backquotes as Markdown's single ones."""
    return (doc or "").strip().splitlines()[0].replace("``", "`") if doc else ""
