"""Smoke tests of issue 3's benchmark scripts (experiments/bench_inference, experiments/bench_fastai).

They check that the scripts run and write what their READMEs promise, on tiny inputs; the numbers
themselves are measured by the full runs, on an idle machine, never here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INFERENCE = REPO / "experiments" / "bench_inference" / "bench.py"
FASTAI = REPO / "experiments" / "bench_fastai" / "bench.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_bench_inference_quick(tmp_path):
    # one thread: the test must not depend on how busy the shared cores are; the ONNX Runtime row (exporting
    # EfficientNet-Lite0 takes 7-12 s) is tested on a tiny model below
    _run(str(INFERENCE), "--quick", "--no-compile", "--no-onnx", "--threads", "1", "--out", str(tmp_path))
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("images_per_s_batch1", "images_per_s_batch64", "fraction_of_limit", "gflops_per_image",
                "matmul_gflops", "precisions", "machine", "torch", "threads", "command"):
        assert key in res, key
    assert res["quick"] is True and res["threads"] == 1
    assert 0 < res["fraction_of_limit"]
    assert res["images_per_s_batch1"] > 0 and res["images_per_s_batch64"] > 0
    assert res["flops"]["multiply_add_counts_as"] == 2
    assert "fp32" in res["precisions"]
    for details in res["precisions"].values():
        assert details["batch64"]["batch"] == 64 and details["limit_images_per_s"] > 0
    assert "untrained 5-class head" in res["model"]["weights"]  # no --ckpt: says where the weights came from
    assert res["command"].startswith("python experiments/bench_inference/bench.py --quick")
    md = (tmp_path / "results.md").read_text()
    assert "not a measurement" in md and "| precision | batch |" in md
    if res["fraction_of_limit"] < res["target_fraction"]:
        assert res["profiles"] and res["profiles"][0]["top_ops_by_self_cpu"]
        assert "Where the time goes" in md


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime is not installed")
def test_bench_inference_onnx_row() -> None:
    spec = importlib.util.spec_from_file_location("bench_inference", INFERENCE)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from leukonet.model import CellClassifier

    model = CellClassifier(backbone="test_efficientnet", pretrained=False, image_size=32).eval()
    row = bench.time_onnx(model, 48, {"batch1": (1, 2, 2), "batch64": (1, 2, 1)}, threads=1)
    assert row["intra_op_threads"] == 1 and "exporter" in row and row["export_s"] >= 0
    assert row["max_abs_logit_diff_vs_torch_fp32"] < 1e-4  # exported at 48 px, not the trained 32
    for key, batch in (("batch1", 1), ("batch64", 64)):
        assert row[key]["batch"] == batch and row[key]["images_per_s"]["median"] > 0


@pytest.mark.skipif(importlib.util.find_spec("fastai") is None,
                    reason="fastai is not installed (optional: experiments/bench_fastai/run.sh installs it)")
def test_bench_fastai_half_quick(tmp_path):
    from leukonet.classes import CLASSES
    from leukonet.data.folder import scan_folder
    from leukonet.data.split import read_split, stratified_split, write_split
    from leukonet.data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "cells", n_per_class=8, size=48, seed=0)
    write_split(stratified_split(scan_folder(root).entries), tmp_path / "split.csv")
    out = tmp_path / "fastai.json"
    _run(str(FASTAI), "fastai", "--quick", "--data", str(root), "--split", str(tmp_path / "split.csv"),
         "--json", str(out), "--work", str(tmp_path / "work"), "--image-size", "48", "--batch-size", "8",
         "--epochs1", "1", "--epochs2", "1", "--workers", "0", "--threads", "1")
    res = json.loads(out.read_text())
    split = read_split(tmp_path / "split.csv")
    assert res["test_n"] == len(split["test"]) and res["n"]["train"] == len(split["train"])
    assert 0 <= res["test_accuracy"] <= 1 and 0 <= res["test_macro_f1"] <= 1
    assert res["epochs"] == {"phase1": 1, "phase2": 1, "total": 2}
    assert res["phases"]["phase1"]["lr"] == 1e-3 and res["phases"]["phase2"]["lr"] == 1e-5
    assert res["train_images"] > 0 and res["images_per_s"] > 0
    assert res["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert res["weights"].startswith("package:")  # leukonet.weights' packaged ImageNet weights
    assert len(res["confusion_matrix"]) == len(CLASSES)
