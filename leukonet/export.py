"""Export: ``python -m leukonet.export ckpt_path=RUN/checkpoints/last.ckpt [format=onnx] [output=FILE]``.

Writes the model as one self-contained ONNX file (weights inside) with a dynamic batch dimension:
input ``images``, uint8 (batch, 3, image_size, image_size), RGB, values 0-255; output ``logits``,
float32 (batch, classes). The normalisation with the backbone's mean and std is part of the graph,
as it is of ``CellClassifier.forward``; what remains outside is resizing the whole cell image to
``image_size`` and putting its channels first. The file's ``metadata_props`` say all that, with the
class names, image size, mean/std, the leukonet version, the checkpoint's weights source and, where
the checkpoint holds them, the calibration temperature and the review threshold.

Exporter: torch.onnx's dynamo exporter (``torch.export``, the default of recent torch), opset 20;
should it fail on a backbone, the TorchScript exporter is tried instead and the file's ``exporter``
metadata says so. The default output is ``model.onnx`` in the checkpoint's run directory; an
existing file is never overwritten.

``OnnxPredictor`` (``leukonet.inference.onnx_runtime``) runs such a file with ONNX Runtime; ``python -m
leukonet.predict runtime=onnx ckpt_path=RUN/model.onnx input=...`` uses it.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from leukonet.errors import DataError, RunExistsError, exit_on_user_error
from leukonet.train import CONF
from leukonet.training.model import CellClassifier

FORMATS = ("onnx",)
INPUT_NAME, OUTPUT_NAME = "images", "logits"
OPSET = 20


def leukonet_version() -> str:
    try:
        return version("leukonet")
    except PackageNotFoundError:
        return "unknown"


def metadata(model: CellClassifier, ckpt_path: str | Path | None = None) -> dict[str, str]:
    """The preprocessing and provenance an ONNX file carries (all values strings; lists as JSON)."""
    hp = model.hparams
    meta = {
        "leukonet_version": leukonet_version(),
        "class_names": json.dumps(list(hp.class_names)),
        "image_size": str(int(hp.image_size)),
        "input": f"{INPUT_NAME}: uint8 (batch, 3, image_size, image_size), RGB, NCHW (channels first), values 0-255",
        "input_layout": "NCHW",
        "input_color": "RGB",
        "input_dtype": "uint8",
        "output": f"{OUTPUT_NAME}: float32 (batch, classes), in class_names order; "
                  "probabilities = softmax(logits / temperature)",
        "preprocessing": "resize the whole cell image to image_size x image_size (bilinear, OpenCV INTER_LINEAR, "
                         "no crop, aspect ratio not kept), RGB, uint8, channels first; the normalisation "
                         "(x - 255 * mean) / (255 * std) is inside the graph",
        "mean": json.dumps([float(v) for v in hp.mean]),
        "std": json.dumps([float(v) for v in hp.std]),
        "backbone": str(hp.backbone),
        "weights_source": str(model.weights_source or "none: the backbone was randomly initialised"),
    }
    if ckpt_path is not None:
        meta["checkpoint"] = str(ckpt_path)
    temperature = getattr(model, "temperature", None)  # calibration (leukonet.inference.calibration), where the model has it
    if isinstance(temperature, torch.Tensor):
        meta["temperature"] = repr(float(temperature))
    chosen = getattr(model, "chosen_review_threshold", None)
    threshold = chosen() if callable(chosen) else None
    if threshold is not None:
        meta["review_threshold"] = repr(float(threshold))
    return meta


def to_onnx(model: CellClassifier, opset: int = OPSET, size: int | None = None):
    """The model as an ``onnx.ModelProto`` with a dynamic batch, and the exporter that made it. Its input is
    ``size`` pixels square (default: the image size the model was trained at)."""
    import onnx

    for name in ("onnx_ir", "onnxscript"):  # their INFO lines (one per folded constant) under Hydra's logging
        logging.getLogger(name).setLevel(logging.WARNING)
    if getattr(model, "stain_norm", None) is not None:
        raise DataError(f"this model normalises stains ({model.stain_norm.method}), which estimates each image's "
                        "stain statistics in a Python loop the ONNX exporters cannot follow: it cannot be exported; "
                        "use it with predict or serve (runtime=torch)")
    model = model.eval()
    size = int(size or model.hparams.image_size)
    example = (torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8),)  # 2: batch 1 would be specialised
    try:
        program = torch.onnx.export(model, example, None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=opset,
                                    dynamo=True, verbose=False)
        return program.model_proto, f"torch.onnx dynamo exporter (torch {torch.__version__})"
    except Exception as err:  # noqa: BLE001 - any exporter failure: try the older exporter
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"the dynamo ONNX exporter failed ({reason}); using the TorchScript exporter", stacklevel=2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, example, buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return onnx.load_from_string(buf.getvalue()), f"torch.onnx TorchScript exporter (torch {torch.__version__}), " \
                                                   f"after the dynamo exporter failed: {reason}"


def default_output(ckpt_path: Path) -> Path:
    """``RUN/model.onnx`` for ``RUN/checkpoints/NAME.ckpt``; else beside the checkpoint."""
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return run / "model.onnx"


def export_onnx(ckpt_path: str | Path, output: str | Path | None = None, opset: int = OPSET) -> dict:
    """Export a checkpoint to ONNX, check the file with ONNX Runtime against PyTorch, and describe it."""
    import onnx

    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise DataError(f"ckpt_path={ckpt_path} does not exist")
    out = Path(output) if output else default_output(ckpt_path)
    if out.exists():
        raise RunExistsError(f"{out} exists; choose another output=... or remove it")
    model = CellClassifier.from_checkpoint(ckpt_path)
    proto, exporter = to_onnx(model, opset)
    meta = {**metadata(model, ckpt_path), "exporter": exporter, "opset": str(opset)}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (f"leukonet {meta['leukonet_version']}: {meta['backbone']} white blood cell classifier "
                        f"({', '.join(json.loads(meta['class_names']))}). {meta['input']}. {meta['preprocessing']}.")
    onnx.checker.check_model(proto)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with out.open("xb") as f:  # exclusive: never overwrites a file that appeared meanwhile
            f.write(proto.SerializeToString())
    except FileExistsError as err:
        raise RunExistsError(f"{out} exists; choose another output=... or remove it") from err
    return {"output": str(out), "bytes": out.stat().st_size, "exporter": exporter, "opset": opset,
            "max_abs_diff_vs_torch": check_against_torch(out, model), "metadata": meta}


def check_against_torch(onnx_path: str | Path, model: CellClassifier, batch: int = 3, seed: int = 0) -> float:
    """Largest absolute difference between ONNX Runtime's and PyTorch's fp32 logits on random uint8 images."""
    from leukonet.inference.onnx_runtime import session

    size = int(model.hparams.image_size)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        ref = model(x).numpy()
    got = session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    return float(np.abs(got - ref).max())


def export(cfg: DictConfig) -> dict:
    fmt = str(cfg.format).lower()
    if fmt not in FORMATS:
        raise DataError(f"format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    info = export_onnx(cfg.ckpt_path, cfg.output, int(cfg.opset))
    print(f"wrote {info['output']} ({info['bytes'] / 2**20:.1f} MiB, opset {info['opset']}, {info['exporter']}); "
          f"ONNX Runtime vs PyTorch on 3 random images: max |logit difference| {info['max_abs_diff_vs_torch']:.2e}")
    return info


@hydra.main(version_base="1.3", config_path=CONF, config_name="export")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: export(cfg))


if __name__ == "__main__":
    main()
