"""Adaptation to a new lab: BatchNorm statistics, the class mix, self-training, suggestions, the command, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose_cfg, run_module
from leukonet.adapt import batchnorm, label_shift, network, run
from leukonet.adapt.head import pseudo_labels
from leukonet.adapt.run import adapt as run_adapt
from leukonet.adapt.suggest import rank
from leukonet.classes import CLASSES
from leukonet.errors import DataError
from leukonet.inference.cell_kind import FEATURES, PROFILE_KEY
from leukonet.training.model import CellClassifier


def tiny_model() -> CellClassifier:
    torch.manual_seed(0)
    return CellClassifier(backbone="test_efficientnet", pretrained=False, image_size=32, channels_last=False).eval()


def images(n: int, seed: int, tint=(0, 0, 0)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(40, 200, (n, 3, 32, 32), generator=g) + torch.tensor(tint).view(1, 3, 1, 1)
    return x.clamp(0, 255).to(torch.uint8)


def output_moments(model, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per backbone BatchNorm, the per-channel mean and variance of what it normalises ``x`` to (eval mode; before
    the activation that timm's BatchNormAct2d adds)."""
    out = []

    def record(m, args) -> None:
        y = torch.nn.functional.batch_norm(args[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        out.append((y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False)))

    hooks = [m.register_forward_pre_hook(record) for m in batchnorm.backbone_norms(model).values()]
    with torch.no_grad():
        model.backbone(model.preprocess(x))
    for h in hooks:
        h.remove()
    return out


def test_mapped_statistics_make_the_lab_look_like_the_training_lab_to_every_layer() -> None:
    model = tiny_model()
    source, lab = images(48, 0), images(40, 1, tint=(-30, 20, 45))  # another stain: channels shifted
    expected = output_moments(model, source)
    before = output_moments(model, lab)
    batchnorm.map_to_source(model, lab, batchnorm.input_moments(model, source))
    after = output_moments(model, lab)
    assert len(after) == len(expected) > 3
    gap = lambda moments: max(float((m - e).abs().max()) for (m, _), (e, _) in zip(moments, expected))  # noqa: E731
    assert gap(before) > 0.1 and gap(after) < 1e-3  # every layer's output moments match the training lab's
    for (_, v), (_, ve) in zip(after, expected):
        torch.testing.assert_close(v, ve, rtol=1e-3, atol=1e-4)


def test_centre_moments_are_the_cells_whatever_the_framing() -> None:
    """bn_center: moments over the middle of each feature map, where a crop's cell is, not its surroundings."""
    x = torch.zeros(2, 3, 10, 10)
    x[:, :, 3:7, 3:7] = 5.0  # the cell, 40 % of the height and width
    whole, centre = batchnorm._Moments(), batchnorm._Moments(center=0.4)
    whole.add(x)
    centre.add(x)
    assert torch.allclose(centre.result()[0], torch.full((3,), 5.0)) and torch.allclose(centre.result()[1], torch.zeros(3))
    assert torch.allclose(whole.result()[0], torch.full((3,), 0.8))
    model = tiny_model()
    source, lab = images(48, 0), images(40, 1, tint=(-30, 20, 45))
    batchnorm.map_to_source(model, lab, batchnorm.input_moments(model, source, center=0.5), center=0.5)
    assert all(torch.isfinite(m.running_mean).all() for m in batchnorm.backbone_norms(model).values())


def test_adabn_takes_the_labs_own_statistics() -> None:
    model = tiny_model()
    lab = images(40, 1, tint=(-30, 20, 45))
    first = next(iter(batchnorm.backbone_norms(model).values()))
    seen = batchnorm.input_moments(model, lab)  # the first layer's input does not depend on the statistics
    batchnorm.adabn(model, lab)
    mean, var = next(iter(seen.values()))
    torch.testing.assert_close(first.running_mean, mean, rtol=1e-4, atol=1e-5)
    assert not first.training and first.momentum == 0.1  # left as found


def test_em_recovers_a_labs_class_mix() -> None:
    rng = np.random.default_rng(0)
    truth = np.array([0.02, 0.04, 0.3, 0.06, 0.58])  # a normal differential, not the training set's 20 % each
    y = rng.choice(5, 4000, p=truth)
    centres = np.eye(5) * 2.0
    x = centres[y] + rng.normal(size=(4000, 5))
    log_lik = -0.5 * ((x[:, None, :] - centres[None]) ** 2).sum(2)  # training-mix (uniform) posteriors
    posteriors = np.exp(log_lik - log_lik.max(1, keepdims=True))
    posteriors /= posteriors.sum(1, keepdims=True)
    estimate = label_shift.em_prior(posteriors, np.full(5, 0.2))
    assert np.abs(estimate - truth).max() < 0.03
    shift = label_shift.log_shift(estimate, np.full(5, 0.2), temperature=2.0)
    corrected = np.log(posteriors) * 2.0 + shift  # logits at T = 2 plus the shift, then softmax(. / T)
    assert (corrected.argmax(1) == y).mean() > (posteriors.argmax(1) == y).mean()


def test_pseudo_labels_are_class_balanced_and_confident() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.45, 0.55], [0.1, 0.9]])
    assert pseudo_labels(probs, share=0.5, min_confidence=0.5).tolist() == [0, 0, -1, -1, -1, 1]
    assert pseudo_labels(probs, share=1.0, min_confidence=0.58).tolist() == [0, 0, 0, 0, -1, 1]


def lab_batches(n: int = 40) -> tuple[tuple[torch.Tensor, np.ndarray], torch.Tensor, np.ndarray]:
    """Training cells (dark or light, labelled 0 / 1) and another lab's (tinted), whose true class is again
    dark or light."""
    dark, light = images(n, 0).div(3).to(torch.uint8), images(n, 1).clamp(150, 255)
    lab = torch.cat([images(n, 2, (-20, 10, 40)).div(3).to(torch.uint8), images(n, 3, (-20, 10, 40)).clamp(150, 255)])
    return (torch.cat([dark, light]), np.repeat([0, 1], n)), lab, np.repeat([0, 1], n)


def bn_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}


def test_fine_tuning_on_labels_learns_the_labs_cells_and_keeps_the_training_statistics() -> None:
    model = tiny_model()
    source, lab, truth = lab_batches()
    stats = bn_state(model)
    labels = np.full(len(lab), -1)
    labels[[0, 1, 2, 40, 41, 42]] = truth[[0, 1, 2, 40, 41, 42]]  # three labelled cells a class
    before = model(lab.float()).argmax(1).numpy()
    report = network.tune(model, source, lab, labels, network.NetworkTuning("labels", steps=40, lr=1e-2, backbone_lr=1e-3), 0)
    with torch.no_grad():
        after = model(lab.float()).argmax(1).numpy()
    assert report["objective"] == "labels" and report["cells"] == 6 and report["loss_last"] < report["loss_first"]
    assert (after == truth).mean() > max(0.9, (before == truth).mean())
    assert all(torch.equal(stats[k], v) for k, v in bn_state(model).items() if "running" in k)
    assert not model.training and all(p.requires_grad for p in model.parameters())


def test_entropy_tuning_moves_only_the_batchnorm_scale_and_shift() -> None:
    model = tiny_model()
    source, lab, _ = lab_batches()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    norm_params = {n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    report = network.tune(model, source, lab, np.full(len(lab), -1), network.NetworkTuning("entropy", steps=10), 0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(weights[k], v)}
    assert report["objective"] == "entropy" and changed
    assert all(k.rsplit(".", 1)[0] in norm_params and k.endswith(("weight", "bias")) for k in changed), changed


def test_a_network_step_without_what_it_needs_does_nothing() -> None:
    model = tiny_model()
    source, lab, _ = lab_batches(8)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    assert network.tune(model, source, lab, np.full(len(lab), -1), network.NetworkTuning("labels"), 0)["skipped"]
    few = np.full(len(lab), -1)
    few[:3] = 0
    assert "fewer than" in network.tune(model, source, lab, few, network.NetworkTuning("labels", min_labelled=4), 0)["skipped"]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="objective"):
        network.tune(model, source, lab, np.full(len(lab), -1), network.NetworkTuning("sgd"), 0)


def test_suggestions_cover_every_kind_of_cell() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    kind = np.repeat(np.arange(4), [60, 25, 10, 5])  # one kind far more common than the others
    feats = torch.as_tensor(centres[kind] + rng.normal(size=(100, 16)), dtype=torch.float32)
    probs = np.full((100, 5), 0.2)
    picks = rank(feats, probs, 4)
    assert len(set(picks)) == 4 and sorted(kind[picks].tolist()) == [0, 1, 2, 3]
    assert kind[picks[0]] == 0  # largest group first


def test_suggestions_are_shared_over_the_predicted_classes() -> None:
    rng = np.random.default_rng(0)
    feats = torch.as_tensor(rng.normal(size=(100, 16)), dtype=torch.float32)
    predicted = np.repeat(np.arange(5), [60, 25, 10, 3, 2])  # a lab's mix: one class far more common
    probs = np.full((100, 5), 0.1)
    probs[np.arange(100), predicted] = 0.6
    picks = rank(feats, probs, 20)
    assert len(set(picks)) == 20
    assert np.bincount(predicted[picks], minlength=5).tolist() == [5, 5, 5, 3, 2]  # the rare ones all, the rest equally
    assert predicted[picks[:5]].tolist() == [0, 1, 2, 3, 4]  # one of each class in turn, the most predicted first


# -- the command ----------------------------------------------------------------------------------------------------


def other_lab(cells: Path, dest: Path, tint=(-25, 15, 40), per_class: int = 8) -> Path:
    """Copies of synthetic cells in another 'stain', flat (a lab's cells come without class folders)."""
    dest.mkdir(parents=True)
    for c in CLASSES:
        for f in sorted((cells / c).iterdir())[:per_class]:
            x = np.asarray(Image.open(f).convert("RGB")).astype(int) + np.array(tint)
            Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(dest / f"{c}_{f.stem}.png")
    return dest


def test_the_lab_profile_is_measured_on_a_seeded_draw_of_the_labs_cells(cells: Path, tmp_path: Path, monkeypatch) -> None:
    paths = sorted(other_lab(cells, tmp_path / "lab", per_class=4).iterdir())
    monkeypatch.setattr(run, "PROFILE_CELLS", 12)
    profile, n = run.lab_profile(paths, seed=1)
    assert profile.shape == (FEATURES,) and 0 < n <= 12  # the cells with a nucleus among the 12 drawn
    assert torch.equal(run.lab_profile(paths, seed=1)[0], profile)
    assert not torch.equal(run.lab_profile(paths, seed=2)[0], profile)
    monkeypatch.setattr(run, "PROFILE_CELLS", 300)
    assert run.lab_profile(paths, seed=1)[1] > 12  # fewer cells than the cap: every one


def adapt(ckpt: Path, out: Path, *extra: str):
    return run_module("leukonet.adapt", f"ckpt_path={ckpt}", f"hydra.run.dir={out}", "min_cells=20", *extra)


def test_adapt_writes_a_checkpoint_that_evaluate_and_predict_use(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    lab = other_lab(cells, tmp_path / "lab")
    labels = tmp_path / "labels.csv"
    labelled = sorted(lab.iterdir())[::4]
    with labels.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([f"lab/{p.name}", p.name.split("_")[0]] for p in labelled)
    out = tmp_path / "adapted"
    proc = adapt(ckpt, out, f"target.root={lab}", f"target.labels={labels}", "method=bn_map_self_train",
                 "+method.network={objective: labels, steps: 3, batch: 4}",  # the whole network too (briefly)
                 "calibration.min_labelled=5")  # 10 labelled cells: the temperature is refitted on them
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "adaptation.json").read_text())
    assert report["cells"] == 40 and report["labelled"] == len(labelled) and report["method"]["bn"] == "map"
    assert abs(sum(report["estimated_proportions"].values()) - 1) < 1e-6
    assert set(report["class_mix_after"]) == set(CLASSES) and 0 <= report["changed_class"] <= 40
    assert report["self_training"][0]["labelled"] == len(labelled)
    assert report["network"] == {**report["network"], "objective": "labels", "steps": 3, "cells": len(labelled)}
    assert report["calibration"]["refitted_on"].startswith("10 labelled cells") and report["calibration"]["n"] == 10
    assert "adapted to the 40 cells" in (out / "adaptation.md").read_text()
    assert f"whole network: fine-tuned on {len(labelled)} cells, 3 steps" in (out / "adaptation.md").read_text()
    adapted = torch.load(out / "adapted.ckpt", weights_only=True)
    original = torch.load(ckpt, weights_only=True)
    assert adapted["adaptation"]["checkpoint"] == str(ckpt) and "ood" in adapted
    assert adapted[PROFILE_KEY].shape == (FEATURES,) and report["cell_kind_profile_cells"] == 40  # the lab's profile
    changed = [k for k in original["state_dict"] if not torch.equal(original["state_dict"][k], adapted["state_dict"][k])]
    assert any("running_mean" in k for k in changed) and any(k.startswith("head.") for k in changed)
    assert any(k.startswith("backbone.") and k.endswith("conv.weight") for k in changed)  # fine-tuned, not only the head

    evaluated = run_module("leukonet.evaluate", f"ckpt_path={out / 'adapted.ckpt'}", f"data.root={cells}",
                           f"hydra.run.dir={tmp_path / 'eval'}", "data.num_workers=0")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 100
    predicted = run_module("leukonet.predict", f"ckpt_path={out / 'adapted.ckpt'}", f"input={lab}",
                           f"hydra.run.dir={tmp_path / 'predict'}")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert json.loads((tmp_path / "predict" / "differential.json").read_text())["cells"] == 40
    few = tmp_path / "few"  # too few cells for a run's own lab profile: the adapted checkpoint's is used
    few.mkdir()
    for p in sorted(lab.iterdir())[:5]:
        shutil.copy(p, few / p.name)
    checked = run_module("leukonet.predict", f"ckpt_path={out / 'adapted.ckpt'}", f"input={few}", "kind_check=true",
                         f"hydra.run.dir={tmp_path / 'predict_few'}")
    assert checked.returncode == 0, checked.stderr[-3000:]
    summary = json.loads((tmp_path / "predict_few" / "differential.json").read_text())
    assert summary["lab_profile"].startswith("checkpoint (leukonet.adapt)") and "cell-kind check" in summary["ood_check"]

    again = adapt(ckpt, out, f"target.root={lab}")
    assert again.returncode == 2 and "never writes over" in again.stderr
    assert torch.equal(torch.load(out / "adapted.ckpt", weights_only=True)["state_dict"]["head.2.weight"],
                       adapted["state_dict"]["head.2.weight"])


def test_the_class_mix_correction_lands_in_the_checkpoint(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    lab = other_lab(cells, tmp_path / "lab")
    out = tmp_path / "adapted"
    proc = adapt(trained_run / "checkpoints" / "last.ckpt", out, f"target.root={lab}", "method=prior")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "adaptation.json").read_text())
    state = torch.load(out / "adapted.ckpt", weights_only=True)["state_dict"]
    estimate = np.array([report["estimated_proportions"][c] for c in CLASSES])
    expected = label_shift.log_shift(estimate, np.full(5, 0.2), float(state["temperature"]))
    np.testing.assert_allclose(state["log_prior_shift"].numpy(), expected, rtol=1e-4, atol=1e-5)
    assert report["prior_applied"] and "kept the checkpoint's" in report["calibration"]["note"]


def test_suggest_writes_the_cells_to_label_and_a_contact_sheet(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    lab = other_lab(cells, tmp_path / "lab")
    proc = run_module("leukonet.adapt.suggest", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                      f"target.root={lab}", "n=7", f"hydra.run.dir={tmp_path / 's'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "s" / "to_label.csv").open()))
    assert [int(r["rank"]) for r in rows] == list(range(1, 8)) and len({r["path"] for r in rows}) == 7
    assert all(Path(r["path"]).parent == lab.resolve() and r["label"] == "" for r in rows)
    assert (tmp_path / "s" / "to_label.png").stat().st_size > 1000
    # half filled in by the lab: read as labels (empty ones skipped), and not suggested again
    text = (tmp_path / "s" / "to_label.csv").read_text().splitlines()
    text[1] = text[1].replace(",,", ",basophil,", 1)
    (tmp_path / "labels.csv").write_text("\n".join(text) + "\n")
    second = run_module("leukonet.adapt.suggest", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                        f"target.root={lab}", f"target.labels={tmp_path / 'labels.csv'}", "n=7",
                        f"hydra.run.dir={tmp_path / 's2'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert rows[0]["path"] not in (tmp_path / "s2" / "to_label.csv").read_text()


@pytest.mark.parametrize("case", ["empty", "too_few", "unknown_file", "unknown_class", "training_set", "stain_norm",
                                  "objective"])
def test_bad_input_is_named_and_nothing_is_written(case: str, trained_run: Path, cells: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    lab = tmp_path / "lab"
    if case == "empty":
        lab.mkdir()
        (lab / "notes.txt").write_text("no images")
    elif case == "training_set":
        lab = Path(json.loads((trained_run / "data_summary.json").read_text())["root"])
    else:
        other_lab(cells, lab, per_class=2 if case == "too_few" else 8)
        (lab / "broken.png").write_bytes(b"not a png")  # named and skipped, never fatal
    extra = []
    if case in ("unknown_file", "unknown_class"):
        name = "elsewhere/x.png" if case == "unknown_file" else f"lab/{sorted(lab.iterdir())[0].name}"
        (tmp_path / "labels.csv").write_text(f"path,label\n{name},{'basophil' if case == 'unknown_file' else 'blast'}\n")
        extra.append(f"target.labels={tmp_path / 'labels.csv'}")
    if case == "stain_norm":
        state = torch.load(ckpt, weights_only=True)
        state["hyper_parameters"]["stain_norm"] = "reinhard"
        ckpt = tmp_path / "reinhard.ckpt"
        torch.save(state, ckpt)
    if case == "objective":
        extra.append("++method.network.objective=sgd")
    expected = {"empty": "holds no image files", "too_few": "needs at least 20", "unknown_file": "not among the target",
                "unknown_class": "name no class we know", "training_set": "own training cells",
                "stain_norm": "normalises stains", "objective": "method.network.objective must be one of"}[case]
    cfg = compose_cfg("adapt", [f"ckpt_path={ckpt}", f"target.root={lab}", "min_cells=20", *extra], tmp_path / "out")
    with pytest.raises(DataError, match=expected):
        run_adapt(cfg)
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_checkpoint_without_the_prior_buffer_still_loads(trained_run: Path, tmp_path: Path) -> None:
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    del state["state_dict"]["log_prior_shift"]
    torch.save(state, tmp_path / "old.ckpt")
    model = CellClassifier.from_checkpoint(tmp_path / "old.ckpt")
    assert torch.equal(model.log_prior_shift, torch.zeros(5))
