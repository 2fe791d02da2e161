"""Export to ONNX: same logits as PyTorch at any batch size, the preprocessing in the file's metadata,
predict's ONNX Runtime path, and no silent overwrite."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_cfg, run_module

ort = pytest.importorskip("onnxruntime")

from leukonet.errors import DataError, RunExistsError  # noqa: E402
from leukonet.export import export_onnx  # noqa: E402
from leukonet.predict import load_predictor, predict  # noqa: E402
from leukonet.training.model import CellClassifier  # noqa: E402


@pytest.fixture(scope="module")
def exported(trained_run: Path, tmp_path_factory) -> Path:
    """``python -m leukonet.export`` on a copy of the run's last checkpoint, to the default output."""
    run = tmp_path_factory.mktemp("export") / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    proc = run_module("leukonet.export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "format=onnx",
                      f"hydra.run.dir={run.parent / 'hydra'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max |logit difference|" in proc.stdout
    assert (run / "model.onnx").is_file()  # the default output: the checkpoint's run directory
    return run / "model.onnx"


def test_onnx_logits_match_torch_at_any_batch_size(exported: Path) -> None:
    model = CellClassifier.from_checkpoint(exported.parent / "checkpoints" / "last.ckpt")
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [3, 32, 32]
    assert isinstance(inp.shape[0], str) and isinstance(out.shape[0], str)  # a dynamic batch dimension
    g = torch.Generator().manual_seed(0)
    for batch in (1, 3):
        x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g)
        with torch.inference_mode():
            ref = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, 5) and got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-4


def test_onnx_metadata_documents_the_preprocessing(exported: Path) -> None:
    model = CellClassifier.from_checkpoint(exported.parent / "checkpoints" / "last.ckpt")
    meta = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == list(model.hparams.class_names)
    assert meta["image_size"] == "32" and meta["input_layout"] == "NCHW" and meta["input_dtype"] == "uint8"
    assert meta["input_color"] == "RGB" and "inside the graph" in meta["preprocessing"]
    assert json.loads(meta["mean"]) == pytest.approx(list(model.hparams.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(model.hparams.std))
    assert meta["leukonet_version"] and meta["backbone"] == "test_efficientnet"
    assert "randomly initialised" in meta["weights_source"]  # TINY: model.pretrained=false
    assert "dynamo" in meta["exporter"] and meta["opset"] == "20"
    if hasattr(model, "temperature"):  # calibration, where the checkpoint holds it
        assert float(meta["temperature"]) == pytest.approx(float(model.temperature))
        chosen = model.chosen_review_threshold()
        if chosen is None:
            assert "review_threshold" not in meta
        else:
            assert float(meta["review_threshold"]) == pytest.approx(chosen)


def test_metadata_carries_the_calibration_when_the_model_has_it() -> None:
    from leukonet.export import metadata

    model = CellClassifier(backbone="test_efficientnet", pretrained=False, image_size=32).eval()
    if not hasattr(model, "temperature"):
        pytest.skip("this model has no calibration buffers")
    model.temperature.fill_(1.5)
    model.review_threshold.fill_(0.8)
    meta = metadata(model, "x.ckpt")
    assert float(meta["temperature"]) == 1.5 and float(meta["review_threshold"]) == pytest.approx(0.8)
    assert meta["checkpoint"] == "x.ckpt"


def test_predict_with_onnx_runtime_gives_the_same_classes(exported: Path, cells: Path, tmp_path: Path) -> None:
    ckpt = exported.parent / "checkpoints" / "last.ckpt"
    results = {}
    for runtime, path in (("torch", ckpt), ("onnx", exported)):
        cfg = compose_cfg("predict", [f"ckpt_path={path}", f"input={cells}", f"runtime={runtime}", "fields=false",
                                      "precision=32-true", "progress=false"], tmp_path / runtime)
        summary = predict(cfg)
        assert summary["runtime"] == runtime and summary["cells"] == 100
        results[runtime] = list(csv.DictReader((tmp_path / runtime / "predictions.csv").open()))
    torch_rows, onnx_rows = results["torch"], results["onnx"]
    assert [r["file"] for r in torch_rows] == [r["file"] for r in onnx_rows]
    # torch also runs the not-a-leukocyte feature check (leukonet.inference.ood), which ONNX models lack:
    # it may leave a cell unclassified
    assert all(a["predicted"] == b["predicted"] or (a["ood_reason"] == "unfamiliar features" and b["predicted"])
               for a, b in zip(torch_rows, onnx_rows))
    assert max(abs(float(a["confidence"]) - float(b["confidence"])) for a, b in zip(torch_rows, onnx_rows)) < 1e-4


def test_export_never_overwrites_and_runtimes_are_checked(exported: Path) -> None:
    before = exported.read_bytes()
    with pytest.raises(RunExistsError, match="exists"):
        export_onnx(exported.parent / "checkpoints" / "last.ckpt")
    assert exported.read_bytes() == before
    with pytest.raises(DataError, match="runtime=onnx runs an exported model"):
        load_predictor(exported.parent / "checkpoints" / "last.ckpt", "onnx")
    with pytest.raises(DataError, match="add runtime=onnx"):
        load_predictor(exported, "torch")
