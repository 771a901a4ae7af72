"""Training: a few steps learn, rounds write checkpoints, resume is exact, rounds chain,
evaluation writes mIoU, the full reference, and the CLI's train/evaluate/label."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cli_runner import run_cli
from gpual.errors import GpualError
from gpual.workspace import Workspace

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpual.synthetic import make_scenes

    return make_scenes(tmp_path_factory.mktemp("data") / "scenes", n_train=6, n_val=2, height=48, width=64).root


def labeled_workspace(root: Path, scenes: Path, budget: int = 60) -> Workspace:
    """Demo preset on the scenes, superpixels, a random round-0 query of ``budget`` regions, labeled."""
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.oracle import label_round
    from gpual.superpixels import build_cache

    ws = Workspace.create(root, make_config("demo", {"data": {"root": str(scenes), "dataset": "folder"}}))
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=budget)
    label_round(ws, 0)
    return ws


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory: pytest.TempPathFactory, scenes: Path) -> tuple[Workspace, dict]:
    from gpual.training.loop import train_round

    ws = labeled_workspace(tmp_path_factory.mktemp("trained") / "ws", scenes)
    return ws, train_round(ws, 0, CPU, epochs=2)


# --- pieces -----------------------------------------------------------------------------


def test_resolve_device() -> None:
    from gpual.backend import resolve_device

    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(GpualError, match="not one of") as err:
        resolve_device("tpu")
    assert err.value.exit_code == 2
    if not torch.cuda.is_available():
        with pytest.raises(GpualError, match="--device cuda") as err:
            resolve_device("cuda")
        assert err.value.exit_code == 2


def test_random_hflip_flips_image_and_target_together() -> None:
    from gpual.loading import pad_collate
    from gpual.training.data import random_hflip

    images = torch.arange(4 * 2 * 3 * 3, dtype=torch.uint8).reshape(4, 2, 3, 3)
    targets = images[..., 0].clone()
    out_images, out_targets = random_hflip(images, targets, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(out_images[i], images[i].flip(1))) for i in range(4)]
    assert any(flipped) and not all(flipped)  # this seed flips some of the four
    for i, f in enumerate(flipped):
        assert torch.equal(out_targets[i], targets[i].flip(1) if f else targets[i])
        assert f or torch.equal(out_images[i], images[i])
    batch = pad_collate([(torch.ones(2, 3, 3, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8)),
                         (torch.ones(3, 2, 3, dtype=torch.uint8), torch.ones(3, 2, dtype=torch.uint8))])
    assert batch[0].shape == (2, 3, 3, 3) and batch[1].shape == (2, 3, 3)
    assert batch[1][0, 2].tolist() == [255, 255, 255] and batch[1][1, :, 2].tolist() == [255, 255, 255]
    assert batch[0][0, 2].sum() == 0


def test_a_few_steps_lower_the_loss_and_raise_miou(scenes: Path) -> None:
    from gpual.config import make_config
    from gpual.datasets import load_pair, open_dataset
    from gpual.memory_bank import MemoryBank
    from gpual.metrics import confusion_matrix, mean_iou
    from gpual.model import build_model, normalize
    from gpual.teacher import make_teacher
    from gpual.training.loop import Trainer, make_optimizer, train_step

    spec = open_dataset("folder", scenes)
    pairs = [load_pair(spec, s) for s in spec.samples("train")]
    images = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs])).long()
    torch.manual_seed(0)
    config = make_config("demo")
    model = build_model(config.model, spec.num_classes)
    bank = MemoryBank(spec.num_classes, config.contrastive.bank_size, config.model.projection_dim, CPU)
    t = Trainer(model, make_teacher(model), bank, make_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False),
                config, amp=False)
    assert not t.optimizer.defaults["fused"]  # the CPU keeps the plain Adam

    def miou() -> float:
        model.eval()
        with torch.no_grad():
            pred = model.segment(normalize(images)).argmax(1)
        model.train()
        return mean_iou(confusion_matrix(pred, labels, spec.num_classes))

    before = miou()
    g = torch.Generator().manual_seed(0)
    stats = [train_step(t, images, labels, g) for _ in range(12)]
    after = miou()
    # The statistics are 0-d tensors on the model's device (reading them is the caller's wait).
    assert all(v.ndim == 0 and v.device == CPU for v in stats[0].values()) and stats[0]["anchors"].dtype == torch.int64
    assert stats[-1]["loss"] < 0.75 * stats[0]["loss"], [float(s["loss"]) for s in stats]
    assert after > before + 0.1, (before, after)
    assert stats[0]["anchors"] == 0 and stats[-1]["anchors"] > 0  # cold start, then the bank has entries
    assert (bank.filled() > 0).all()
    # The teacher moved towards the student, by EMA (not a copy).
    s, te = model.classifier[4].weight, t.teacher.classifier[4].weight
    assert not torch.equal(s, te)


def test_ema_warmup_for_fresh_weights(scenes: Path) -> None:
    from gpual.config import make_config
    from gpual.datasets import load_pair, open_dataset
    from gpual.memory_bank import MemoryBank
    from gpual.model import build_model
    from gpual.teacher import make_teacher
    from gpual.training.loop import Trainer, make_optimizer, train_step

    config = make_config("cpu-small")  # ema_decay 0.99
    spec = open_dataset("folder", scenes)
    torch.manual_seed(0)
    model = build_model(config.model, spec.num_classes)
    t = Trainer(model, make_teacher(model), MemoryBank(spec.num_classes, 50, config.model.projection_dim, CPU),
                make_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False), config, amp=False,
                ema_warmup=True)
    assert t.ema_decay() == 0.0
    t.step = 1
    assert t.ema_decay() == pytest.approx(0.5)
    t.step = 99
    assert t.ema_decay() == pytest.approx(0.99)
    t.step = 5000
    assert t.ema_decay() == pytest.approx(0.99)
    t.ema_warmup = False
    t.step = 0
    assert t.ema_decay() == pytest.approx(0.99)

    # First step of a fresh run: decay 0, so the teacher becomes the student exactly.
    t.ema_warmup, t.step = True, 0
    pair = load_pair(spec, spec.samples("train")[0])
    images = torch.from_numpy(pair[0][None])
    labels = torch.from_numpy(pair[1][None]).long()
    train_step(t, images, labels, torch.Generator().manual_seed(0))
    assert t.step == 1
    for (name, p_s), p_t in zip(model.named_parameters(), t.teacher.parameters()):
        assert torch.equal(p_s, p_t), name


def _step_setup(device: torch.device, amp: bool, classes: int = 5) -> tuple:
    """A demo-preset trainer on ``device`` with a bank holding a few vectors per class
    (so the contrastive term has anchors), and a (2, 32, 48) batch, half of it labelled."""
    from gpual.config import make_config
    from gpual.memory_bank import MemoryBank
    from gpual.model import build_model
    from gpual.teacher import make_teacher
    from gpual.training.loop import Trainer, make_optimizer, make_scaler, memory_format

    config = make_config("demo")
    torch.manual_seed(0)
    model = build_model(config.model, classes).to(device, memory_format=memory_format(device))
    bank = MemoryBank(classes, config.contrastive.bank_size, config.model.projection_dim, device)
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        bank.push(c, torch.nn.functional.normalize(torch.randn(3, config.model.projection_dim, generator=g), dim=1))
    t = Trainer(model, make_teacher(model), bank, make_optimizer(model, config), make_scaler(device, amp), config, amp)
    images = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8, generator=g).to(device)
    targets = torch.randint(0, classes, (2, 32, 48), generator=g)
    targets[:, :16] = 255
    return t, images, targets.to(device)


def test_a_step_reads_nothing_on_the_host() -> None:
    # The whole step (forward, CE, anchors, negatives, InfoNCE, backward, Adam, EMA, bank
    # push) on the meta device, where nonzero, boolean-mask indexing, item, tolist and
    # copies to the host raise: nothing in it waits for the device's data.
    from gpual.training.loop import train_step

    meta = torch.device("meta")
    t, images, targets = _step_setup(meta, amp=False)
    for _ in range(2):
        stats = train_step(t, images, targets, torch.Generator().manual_seed(0))
    assert all(v.device == meta and v.shape == () for v in stats.values()) and t.step == 2


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_a_cuda_step_never_synchronises(amp: bool) -> None:
    from gpual.backend import amp_dtype
    from gpual.training.loop import step_on_host, train_step

    cuda = torch.device("cuda")
    if amp and amp_dtype(cuda) != torch.bfloat16:
        pytest.skip("float16 AMP (no native bf16 here) scales the loss with a GradScaler: not the sync-free path")
    t, images, targets = _step_setup(cuda, amp)
    assert t.optimizer.defaults["fused"] and t.scaler.is_enabled() is False
    g = torch.Generator(device=cuda).manual_seed(0)
    train_step(t, images, targets, g)  # warm-up: Adam's state, cuDNN's plans, the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        stats = [train_step(t, images, targets, g) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = [step_on_host(s) for s in stats]
    assert all(np.isfinite(h["loss"]) for h in host) and host[-1]["anchors"] > 0, host


# --- rounds -----------------------------------------------------------------------------


def test_train_round_writes_checkpoint_and_evaluate_writes_miou(trained_ws) -> None:
    from gpual.evaluation import evaluate
    from gpual.training.checkpoints import load_bank, load_checkpoint, load_teacher

    ws, summary = trained_ws
    assert ws.checkpoint_path(0).exists() and not ws.resume_path(0).exists()
    assert summary["epochs"] == 2 and len(summary["loss_per_epoch"]) == 2 and summary["images"] == 6
    assert summary["labeled_pixels"] == ws.read_labeled(0)["pixels"].sum() - _void_pixels(ws)
    assert ws.read_metrics(0)["training"]["final_loss"] == pytest.approx(summary["final_loss"])
    student, teacher, bank, meta = load_checkpoint(ws.checkpoint_path(0), CPU)
    assert student.training and not teacher.training
    assert meta["num_classes"] == 5 and meta["model"]["backbone"] == "resnet18"
    assert bank.filled().sum() > 0 and bank.vectors()[0].shape[1] == 128
    assert not torch.equal(student.classifier[4].weight, teacher.classifier[4].weight)
    # Inference reads only the teacher (or only the bank), with the same weights.
    alone, alone_meta = load_teacher(ws.checkpoint_path(0), CPU)
    assert alone_meta == meta and not alone.training and not any(p.requires_grad for p in alone.parameters())
    assert all(torch.equal(a, b) for a, b in zip(alone.state_dict().values(), teacher.state_dict().values(), strict=True))
    assert torch.equal(load_bank(ws.checkpoint_path(0), CPU).vectors()[0], bank.vectors()[0])
    with pytest.raises(GpualError, match="train that round first"):
        load_teacher(ws.checkpoint_path(5), CPU)

    result = evaluate(ws, 0, "val", CPU)
    assert 0.0 <= result["miou"] <= 1.0 and set(result["iou"]) == {"background", "disc", "box", "triangle", "stripe"}
    confusion = np.array(result["confusion"])
    from gpual.datasets import load_pair, open_dataset

    spec = open_dataset("folder", ws.config.data.root)
    labeled = sum(int((load_pair(spec, s)[1] != 255).sum()) for s in spec.samples("val"))
    assert confusion.shape == (5, 5) and confusion.sum() == labeled
    metrics = ws.read_metrics(0)
    assert metrics["evaluation"]["miou"] == result["miou"] and "val" in metrics["evaluations"]
    assert ws.round_state(0).evaluated
    with pytest.raises(GpualError, match="split 'test' not found"):
        evaluate(ws, 0, "test", CPU)
    from gpual.training.loop import train_round

    with pytest.raises(GpualError, match="already exists"):
        train_round(ws, 0, CPU)


def _void_pixels(ws: Workspace) -> int:
    """Void pixels inside the labeled regions (counted in `pixels`, not trained on)."""
    from gpual.datasets import open_dataset, read_label
    from gpual.superpixels import load_superpixels

    spec = open_dataset("folder", ws.config.data.root)
    samples = {s.id: s for s in spec.samples("train")}
    total = 0
    for image, group in ws.read_labeled(0).groupby("image"):
        inside = np.isin(load_superpixels(ws, image), group["region"].to_numpy())
        total += int((read_label(spec, samples[image].label)[inside] == 255).sum())
    return total


def test_interrupted_training_resumes_exactly(trained_ws, tmp_path: Path, scenes: Path) -> None:
    from gpual.training.checkpoints import load_checkpoint
    from gpual.training.loop import train_round

    reference, _ = trained_ws
    ws = labeled_workspace(tmp_path / "ws", scenes)
    same = ["image", "region", "round", "kind", "class", "pixels", "labeled_pixels", "source"]  # not the times written
    pd.testing.assert_frame_equal(ws.read_labeled(0)[same], reference.read_labeled(0)[same])

    def interrupt(done: int, total: int) -> None:
        if done > total // 2:  # after the first step of epoch 2: epoch 1 is saved, epoch 2 is not
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_round(ws, 0, CPU, epochs=2, progress=interrupt)
    assert ws.resume_path(0).exists() and not ws.checkpoint_path(0).exists()
    with pytest.raises(GpualError, match="--resume"):
        train_round(ws, 0, CPU, epochs=2)
    logged = []
    summary = train_round(ws, 0, CPU, resume=True, epochs=2, log=logged.append)
    assert summary["resumed_from_epoch"] == 1 and not ws.resume_path(0).exists()
    # The log callback gets Python numbers; the epoch's mean is theirs.
    assert logged and all(type(step[k]) is float for step in logged for k in ("loss", "ce", "nce"))
    assert all(type(step["anchors"]) is int and step["epoch"] == 2 for step in logged)
    assert summary["loss_per_epoch"][1] == pytest.approx(np.mean([step["loss"] for step in logged]), rel=1e-6)
    a = load_checkpoint(reference.checkpoint_path(0), CPU)
    b = load_checkpoint(ws.checkpoint_path(0), CPU)
    for model_a, model_b in ((a[0], b[0]), (a[1], b[1])):
        for (name, x), y in zip(model_a.state_dict().items(), model_b.state_dict().values()):
            assert torch.equal(x, y), name
    assert torch.equal(a[2].vectors()[0], b[2].vectors()[0])
    with pytest.raises(GpualError, match="nothing to resume"):
        ws.checkpoint_path(0).unlink()
        train_round(ws, 0, CPU, resume=True, epochs=2)


def test_next_round_continues_from_the_last_one(trained_ws) -> None:
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.model import build_model
    from gpual.oracle import label_round
    from gpual.training.checkpoints import load_checkpoint
    from gpual.training.loop import train_round

    ws, _ = trained_ws
    round0 = ws.read_labeled(0)
    # A query that repeats a labeled region is refused by the oracle.
    bad = round0.iloc[:2][["image", "region"]].assign(round=1, strategy="random", score=0.0, pixels=1)
    ws.write_query(1, bad)
    with pytest.raises(GpualError, match="already labeled before round 1"):
        label_round(ws, 1)
    assert not ws.answers_path(1).exists()
    acquire(ws, 1, cpu_backend(), strategy="random", budget=20, force=True)
    label_round(ws, 1)
    table = ws.read_labeled(1)
    assert len(table) == len(round0) + 20 and (table["round"].to_numpy() == [0] * len(round0) + [1] * 20).all()

    train_round(ws, 1, CPU, epochs=1)
    _, teacher0, bank0, _ = load_checkpoint(ws.checkpoint_path(0), CPU)
    _, teacher1, bank1, _ = load_checkpoint(ws.checkpoint_path(1), CPU)
    fresh = build_model(ws.config.model, 5)

    def distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
        return sum(float((x - y).detach().norm()) for x, y in zip(a.parameters(), b.parameters()))

    # One step of EMA at 0.99 moves the teacher by 1% of the student's lead: far closer than any fresh model.
    assert distance(teacher1, teacher0) < 0.05 * distance(fresh, teacher0)
    old = {tuple(v.tolist()) for v in bank0.vectors()[0][:5]}
    assert old & {tuple(v.tolist()) for v in bank1.vectors()[0]}  # the bank carried over (FIFO not yet full of new ones)


def test_full_reference_trains_and_evaluates(trained_ws) -> None:
    import json

    from gpual.evaluation import evaluate
    from gpual.training.loop import train_full

    ws, _ = trained_ws
    summary = train_full(ws, CPU, epochs=1)
    assert summary["images"] == 6 and (ws.full_dir / "checkpoint.pt").exists()
    result = evaluate(ws, None, "val", CPU)
    stored = json.loads((ws.full_dir / "metrics.json").read_text())
    assert stored["evaluation"]["miou"] == result["miou"] and stored["training"]["epochs"] == 1


def test_final_retraining_is_the_reference_but_for_the_labels(trained_ws, tmp_path: Path, scenes: Path) -> None:
    from gpual.evaluation import evaluate
    from gpual.superpixels import read_index
    from gpual.training.checkpoints import load_checkpoint
    from gpual.training.loop import train_final, train_full

    # Fresh weights, its own folder: the round's model and metrics stay as they were.
    ws, _ = trained_ws
    round_metrics = ws.read_metrics(0)
    summary = train_final(ws, 0, CPU, epochs=1)
    run = ws.model_run(0, final=True)
    assert run.checkpoint == ws.round_dir(0) / "final" / "checkpoint.pt" and run.checkpoint.exists() and not run.state.exists()
    assert summary["epochs"] == 1 and summary["images"] == 6
    student, _, _, meta = load_checkpoint(run.checkpoint, CPU)
    assert meta["round"] == 0 and meta["final"] is True and meta["epochs"] == 1
    round_student = load_checkpoint(ws.checkpoint_path(0), CPU)[0]
    assert not torch.equal(student.classifier[4].weight, round_student.classifier[4].weight)
    result = evaluate(ws, 0, "val", CPU, final=True)
    assert ws.read_run_metrics(run)["evaluation"]["miou"] == result["miou"] and result["final"] is True
    assert ws.read_metrics(0) == round_metrics
    assert ws.status()["rounds"][0]["final_miou"] == result["miou"]
    with pytest.raises(GpualError, match="already exists"):
        train_final(ws, 0, CPU, epochs=1)
    # Training it again (checkpoint deleted) drops the evaluation of the model it replaces.
    run.checkpoint.unlink()
    train_final(ws, 0, CPU, epochs=1)
    assert "evaluation" not in ws.read_run_metrics(run) and "final_miou" not in ws.status()["rounds"][0]

    # With every region labelled, the final retraining is the reference, weight for weight:
    # same initialisation, shuffles, flips and dropout; only the labels may differ.
    everything = labeled_workspace(tmp_path / "all", scenes, budget=int(read_index(ws)["n_regions"].sum()))
    train_final(everything, 0, CPU, epochs=1)
    train_full(everything, CPU, epochs=1)
    final = load_checkpoint(everything.model_run(0, final=True).checkpoint, CPU)[0].state_dict()
    full = load_checkpoint(everything.model_run(None).checkpoint, CPU)[0].state_dict()
    for name, value in full.items():
        assert torch.equal(value, final[name]), name


def test_interrupted_final_retraining_resumes(tmp_path: Path, scenes: Path) -> None:
    from gpual.evaluation import evaluate
    from gpual.training.loop import train_final

    ws = labeled_workspace(tmp_path / "ws", scenes)
    run = ws.model_run(0, final=True)

    def interrupt(done: int, total: int) -> None:
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_final(ws, 0, CPU, epochs=2, progress=interrupt)
    assert run.state.exists() and not run.checkpoint.exists()
    with pytest.raises(GpualError, match=r"--round 0 --final --resum"):
        evaluate(ws, 0, "val", CPU, final=True)
    with pytest.raises(GpualError, match=r"--round 0 --final --resume"):
        train_final(ws, 0, CPU, epochs=2)
    assert train_final(ws, 0, CPU, epochs=2, resume=True)["resumed_from_epoch"] == 1
    assert run.checkpoint.exists() and not run.state.exists()


def test_train_refuses_without_labels(tmp_path: Path, scenes: Path) -> None:
    from gpual.config import make_config
    from gpual.evaluation import evaluate
    from gpual.training.loop import train_round

    ws = Workspace.create(tmp_path / "ws", make_config("demo", {"data": {"root": str(scenes), "dataset": "folder"}}))
    with pytest.raises(GpualError, match="no select step"):
        train_round(ws, 0, CPU)
    with pytest.raises(GpualError, match="round 0 is not trained"):
        train_round(ws, 1, CPU)
    with pytest.raises(GpualError, match="no select step"):
        evaluate(ws, 0, "val", CPU)
    with pytest.raises(GpualError, match="gpual train .* --full"):
        evaluate(ws, None, "val", CPU)
    from gpual.training.loop import train_final

    with pytest.raises(GpualError, match="no select step"):
        train_final(ws, 0, CPU)
    with pytest.raises(GpualError, match=r"round 0 \(final retraining\) is not trained: run `gpual train .* --round 0 --final`"):
        evaluate(ws, 0, "val", CPU, final=True)


# --- CLI --------------------------------------------------------------------------------


def test_cli_label_train_evaluate(capsys, tmp_path: Path, scenes: Path) -> None:
    from gpual.acquisition.select import acquire
    from gpual.backend import cpu_backend
    from gpual.config import make_config
    from gpual.superpixels import build_cache

    ws = Workspace.create(tmp_path / "ws", make_config("demo", {"data": {"root": str(scenes), "dataset": "folder"}}))
    build_cache(ws, workers=1)
    acquire(ws, 0, cpu_backend(), budget=40)
    r = run_cli(capsys, "train", ws.root, "--round", "0", "--final")
    assert r.code == 1 and "round 0 has no label step yet" in r.err
    r = run_cli(capsys, "label", ws.root, "--round", "0")
    assert r.code == 0, r.err
    assert "40 of 40 regions answered by the oracle" in r.out
    r = run_cli(capsys, "train", ws.root)
    assert r.code == 2 and "--round N" in r.err
    r = run_cli(capsys, "train", ws.root, "--round", "0", "--full")
    assert r.code == 2 and "not both" in r.err
    r = run_cli(capsys, "evaluate", ws.root, "--round", "0")
    assert r.code == 1 and "no train step" in r.err
    r = run_cli(capsys, "train", ws.root, "--round", "0", "--epochs", "1", "--device", "cpu")
    assert r.code == 0, r.err
    assert "trained 1 epochs" in r.out and ws.checkpoint_path(0).exists()
    r = run_cli(capsys, "evaluate", ws.root, "--round", "0", "--split", "val", "--device", "cpu")
    assert r.code == 0, r.err
    assert "mIoU" in r.out and "stripe" in r.out
    assert ws.read_metrics(0)["evaluation"]["split"] == "val"
    r = run_cli(capsys, "evaluate", ws.root, "--round", "0", "--split", "train")
    assert r.code == 2 and "val or test" in r.err
    r = run_cli(capsys, "train", ws.root, "--full", "--final")
    assert r.code == 2 and "give `gpual train` --round N with it" in r.err
    r = run_cli(capsys, "evaluate", ws.root, "--final")
    assert r.code == 2 and "give `gpual evaluate` --round N with it" in r.err
    r = run_cli(capsys, "evaluate", ws.root, "--round", "0", "--final")
    assert r.code == 1 and "--round 0 --final` first" in r.err
    r = run_cli(capsys, "train", ws.root, "--round", "0", "--final", "--epochs", "1", "--device", "cpu")
    assert r.code == 0, r.err
    assert "round 0 (final retraining)" in r.out and "--round 0 --final --split val" in r.out
    r = run_cli(capsys, "evaluate", ws.root, "--round", "0", "--final", "--device", "cpu")
    assert r.code == 0, r.err
    assert "round 0 (final retraining) on 'val'" in r.out and ws.read_run_metrics(ws.model_run(0, final=True))["evaluation"]
    r = run_cli(capsys, "status", ws.root, "--json")
    final = ws.read_run_metrics(ws.model_run(0, final=True))["evaluation"]["miou"]
    assert r.code == 0 and json.loads(r.out)["rounds"][0]["final_miou"] == final
