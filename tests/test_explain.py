"""Grad-CAM heat maps: shape, range, determinism, the model left as found, the map on the evidence;
predict's heatmaps/ and the report's gallery beside them."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_module
from leukonet.data.cells import synthetic_field
from leukonet.data.transforms import eval_transform
from leukonet.inference.explain import explainer, feature_layer, heatmap, heatmaps, overlay
from leukonet.inference.report import write_report
from leukonet.training.model import CellClassifier


def _model(size: int = 64, **kw) -> CellClassifier:
    torch.manual_seed(0)
    return CellClassifier(backbone="test_efficientnet", pretrained=False, image_size=size, **kw)


def _state(model: CellClassifier) -> tuple:
    return ({n: m.training for n, m in model.named_modules()},
            {n: (p.requires_grad, p.grad) for n, p in model.named_parameters()}, model.backbone_frozen)


def test_feature_layer_is_what_forward_features_returns() -> None:
    import timm

    for name, expected in (("test_efficientnet", "bn2"), ("resnet18", "layer4")):
        net = timm.create_model(name, pretrained=False).eval()
        net.reset_classifier(0)
        assert feature_layer(net) == expected


def test_heatmap_shape_range_determinism_and_model_untouched() -> None:
    model = _model()
    model.train()
    model.freeze_backbone()  # as in phase 1: backbone without gradients, in eval mode; head training
    head_weight = model.head[-1].weight
    head_weight.grad = torch.ones_like(head_weight)  # a gradient a training step left behind
    image = np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    before = _state(model)

    heat = heatmap(model, image, 2)
    assert heat.shape == (70, 50) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.5 and heat.std() > 0  # not a constant map
    after = _state(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert {n: (f, g is None) for n, (f, g) in after[1].items()} == {n: (f, g is None) for n, (f, g) in before[1].items()}
    assert after[1]["head.1.weight"][1] is head_weight.grad and torch.all(head_weight.grad == 1)
    assert np.array_equal(heat, heatmap(model, image, 2))  # deterministic

    # the same map whatever the caller's context: inference mode, bf16 autocast, an unfrozen backbone
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.allclose(heat, heatmap(model, image, 2), atol=1e-5)
    model.unfreeze_backbone()
    model.backbone.requires_grad_(True)  # as phase 2 does
    assert np.allclose(heat, heatmap(model, image, 2), atol=1e-5)
    assert all(p.requires_grad for p in model.parameters()) and model.training

    with torch.no_grad():
        predicted = int(model.eval()(eval_transform(64)(image=image)["image"][None]).argmax())
    assert np.allclose(heatmap(model, image), heatmap(model, image, predicted), atol=1e-5)  # default: predicted class
    two = heatmaps(model, [image, image[:40]], [2, 2])
    assert np.allclose(two[0], heat, atol=1e-4) and two[1].shape == (40, 50)  # batched as one by one

    over = overlay(image, heat)
    assert over.shape == (70, 50, 3) and over.dtype == np.uint8
    grey = np.full((20, 20, 3), 128, np.uint8)
    cold, hot = overlay(grey, np.zeros((20, 20))), overlay(grey, np.ones((20, 20)))
    assert cold[0, 0, 2] > cold[0, 0, 0] and hot[0, 0, 0] > hot[0, 0, 2]  # jet: blue cold, red hot


def _patches(rng: np.random.Generator, n: int, size: int) -> tuple[list[np.ndarray], list[int], list[int]]:
    """Class 0: a red patch, class 1: a green one, on a random side; a blue distractor on the other side."""
    images, labels, sides = [], [], []
    for _ in range(n):
        image = rng.integers(90, 130, (size, size, 3)).astype(np.uint8)
        label, side = int(rng.integers(2)), int(rng.integers(2))
        for s, colour in ((side, (230, 40, 40) if label == 0 else (40, 230, 40)), (1 - side, (40, 40, 230))):
            cx, cy = int(rng.integers(8, size // 2 - 8)) + s * size // 2, int(rng.integers(8, size - 8))
            image[cy - 6:cy + 6, cx - 6:cx + 6] = colour
        images.append(image)
        labels.append(label)
        sides.append(side)
    return images, labels, sides


def test_heatmap_follows_the_evidence() -> None:
    """Trained for a few steps on patches that give the class away, the map of the true class lies on the
    side of that patch, not on the distractor's (a flipped, transposed or constant map fails this)."""
    size = 64
    model = _model(size, class_names=["red", "green"])
    images, labels, _ = _patches(np.random.default_rng(0), 128, size)
    x, y = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        idx = torch.randint(0, len(x), (32,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    images, labels, sides = _patches(np.random.default_rng(1), 40, size)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)).argmax(1) == torch.tensor(labels)).float().mean()
    assert accuracy > 0.9

    def on_signal_side(classes: list[int]) -> int:
        maps = heatmaps(model, images, classes)
        return sum((m[:, : size // 2].sum() > m[:, size // 2:].sum()) == (s == 0) for m, s in zip(maps, sides))

    true_class, other_class = on_signal_side(labels), on_signal_side([1 - k for k in labels])
    assert true_class >= 34, true_class  # 38 of 40 here
    assert true_class - other_class >= 15, (true_class, other_class)  # the map depends on the class asked for


def test_predict_explain_writes_heatmaps(trained_run: Path, cells: Path, tmp_path: Path) -> None:
    data = tmp_path / "today"
    (data / "crops").mkdir(parents=True)
    for src in sorted((cells / "monocyte").iterdir())[:3]:
        shutil.copy(src, data / "crops" / src.name)
    field, truth = synthetic_field(np.random.default_rng(0), (360, 480), 3, ["neutrophil", "lymphocyte", "eosinophil"])
    Image.fromarray(field).save(data / "field.png")
    out = tmp_path / "run"
    proc = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"input={data}",
                      f"hydra.run.dir={out}", "explain=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 3 + len(truth)
    names = sorted(Path(r["heatmap"]).name for r in rows)
    assert names == sorted([f"{f.stem}.png" for f in (data / "crops").iterdir()]
                           + [f"field_cell{k}.png" for k in range(len(truth))])
    for r in rows:
        png = Path(r["heatmap"])
        assert png.parent == out / "heatmaps"
        with Image.open(png) as im:
            assert im.mode == "RGB" and im.size[0] > 0
        if r["cell"] == "":  # a crop: the overlay has the image's own size
            with Image.open(r["file"]) as src:
                assert im.size == src.size

    plain = run_module("leukonet.predict", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                       f"input={data / 'crops'}", f"hydra.run.dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "heatmap" not in (tmp_path / "plain" / "predictions.csv").read_text().splitlines()[0]
    assert not (tmp_path / "plain" / "heatmaps").exists()


def test_training_report_gallery_shows_heatmaps(trained_run: Path) -> None:
    report = (trained_run / "report.md").read_text()
    assert "misclassified" in report
    assert "Grad-CAM heat map for the predicted class" in report
    with Image.open(trained_run / "misclassified.png") as im:
        im.load()
        assert im.size[0] > 300


def test_report_gallery_with_and_without_explain(cells: Path, tmp_path: Path) -> None:
    paths = sorted(str(p) for p in (cells / "basophil").iterdir())[:5]
    probs = np.tile([0.1, 0.6, 0.1, 0.1, 0.1], (5, 1))  # all basophils called eosinophils
    kw = dict(title="t", y_true=np.zeros(5, int), probs=probs, paths=paths,
              class_names=["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"])
    seen: list[tuple[tuple, int]] = []
    model = _model(48)

    def explain(image: np.ndarray, k: int) -> np.ndarray:
        seen.append((image.shape, k))
        return explainer(model)(image, k)

    write_report(tmp_path / "with", explain=explain, gallery_size=3, **kw)
    assert [k for _, k in seen] == [1, 1, 1]  # only the cells shown, for the predicted class
    write_report(tmp_path / "without", **kw)
    with pytest.warns(UserWarning, match="without heat maps"):
        write_report(tmp_path / "failing", explain=lambda image, k: 1 / 0, **kw)
    sizes = {}
    for name in ("with", "without", "failing"):
        with Image.open(tmp_path / name / "misclassified.png") as im:
            im.load()
            sizes[name] = im.size
    assert "Grad-CAM" in (tmp_path / "with" / "report.md").read_text()
    assert "Grad-CAM" not in (tmp_path / "without" / "report.md").read_text()
    assert "Grad-CAM" not in (tmp_path / "failing" / "report.md").read_text()
