"""Pretrained weights: the packaged EfficientNet-Lite0 file really is ImageNet-trained, local files
load without unpickling, and with no source at all the message says what to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from leukonet.errors import WeightsNotFoundError
from leukonet.training import weights
from leukonet.training.model import CellClassifier

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_packaged_lite0_weights_see_a_cat() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = weights.load_pretrained(model, "tf_efficientnet_lite0")
    assert source.kind in ("package", "cache")
    cat = torch.from_numpy(np.ascontiguousarray(skimage_data.chelsea())).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.5  # the package's preprocessing: mean = std = 0.5
    top5 = model.eval()(x).softmax(1).topk(5).indices[0].tolist()
    assert top5[0] in IMAGENET_CATS, top5


def test_weights_file_by_name_and_by_position(tmp_path: Path) -> None:
    src = timm.create_model("test_efficientnet", pretrained=False)
    by_name = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(by_name))
    renamed = tmp_path / "renamed.pth"  # other parameter names, same tensors in the same order
    torch.save({"state_dict": {f"_m{i}": v for i, v in enumerate(src.state_dict().values())}}, renamed)
    for path in (by_name, renamed):
        dst = timm.create_model("test_efficientnet", pretrained=False)
        assert weights.load_pretrained(dst, "test_efficientnet", str(path)).kind == "file"
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_a_weights_file_with_code_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, evil)
    with pytest.raises(WeightsNotFoundError, match="not a readable weights file"):
        weights.load_state_dict_file(evil)


def test_weights_for_another_model_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(3)}, str(other))
    with pytest.raises(WeightsNotFoundError, match="match neither the names nor the shapes"):
        CellClassifier(backbone="test_efficientnet", pretrained=True, weights_file=str(other))


def test_offline_without_weights_stops_with_the_ways_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "_cached_file", lambda model: None)
    monkeypatch.setattr(weights, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsNotFoundError) as err:
        CellClassifier(backbone="resnet34", pretrained=True)
    message = str(err.value)
    for way_out in ("model.weights_file", "+experiment=two_phase_lite0", "model.pretrained=false", "cannot be reached"):
        assert way_out in message


def test_the_cli_prints_the_message_not_a_traceback(tmp_path: Path) -> None:
    from conftest import run_module

    proc = run_module("leukonet.train", "+experiment=two_phase", f"hydra.run.dir={tmp_path}",
                      "model.weights_file=/nonexistent/resnet34.safetensors", timeout=300)
    assert proc.returncode == 2
    assert "resnet34.safetensors does not exist" in proc.stderr and "Traceback" not in proc.stderr
