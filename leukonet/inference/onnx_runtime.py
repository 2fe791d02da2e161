"""Run an exported model (``python -m leukonet.export``) with ONNX Runtime, on the CPU, in fp32.

``OnnxPredictor`` has the interface of ``leukonet.predict.Predictor``: uint8 RGB images of any size
in, class probabilities out. It reads the class names, the image size and the calibration (temperature,
review threshold) from the file's metadata, resizes each image as ``eval_transform`` does, and leaves
the normalisation to the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from leukonet.data.transforms import eval_transform
from leukonet.errors import DataError


def session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime inference session on the CPU (``threads``: intra-op threads; default ORT's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """An exported model with its preprocessing: uint8 RGB images in, class probabilities out."""

    def __init__(self, onnx_path: str | Path, threads: int | None = None) -> None:
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise DataError(f"{onnx_path} does not exist")
        try:
            self.session = session(onnx_path, threads)
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{onnx_path} is not an ONNX model ONNX Runtime can load: {err}") from err
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in ("class_names", "image_size") if k not in self.metadata]
        if missing:
            raise DataError(f"{onnx_path} lacks leukonet's metadata ({', '.join(missing)}): export it with "
                            "python -m leukonet.export")
        self.class_names = list(json.loads(self.metadata["class_names"]))
        self.image_size = int(self.metadata["image_size"])
        self.temperature = float(self.metadata.get("temperature", 1.0))
        threshold = self.metadata.get("review_threshold")
        self.review_threshold = float(threshold) if threshold is not None else None
        self.input_name = self.session.get_inputs()[0].name
        self.transform = eval_transform(self.image_size)

    def logits(self, images: list[np.ndarray]) -> np.ndarray:
        x = np.stack([self.transform(image=im)["image"].numpy() for im in images])  # uint8 (B, 3, H, W)
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        z = self.logits(images).astype(np.float64) / self.temperature
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)
