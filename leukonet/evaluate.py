"""Evaluate a trained model on any folder: ``python -m leukonet.evaluate ckpt_path=... data.root=DIR``.

Without ``data.split_file`` every image under ``data.root`` is scored (an external set); with it,
one split of that file (``split=test`` by default). Writes the same report as training.
"""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from leukonet.errors import DataError, exit_on_user_error
from leukonet.explain import explainer
from leukonet.model import CellClassifier
from leukonet.provenance import command, machine
from leukonet.report import write_report
from leukonet.train import CONF


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint on the chosen images and write report.md, metrics.json and figures."""
    started = time.perf_counter()
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise DataError(f"ckpt_path={ckpt} does not exist")
    model = CellClassifier.from_checkpoint(ckpt)
    split = cfg.split or ("test" if cfg.data.split_file else "all")
    overrides = {"image_size": model.hparams.image_size, "augment": None, "eval_batch_size": cfg.batch_size}
    if split == "all":
        if cfg.data.split_file:
            raise DataError("split=all scores every image under data.root: drop data.split_file, or name a split")
        overrides["split_fractions"] = (0.0, 0.0, 1.0)
        overrides["duplicates"] = "off"  # one split: nothing can leak
    datamodule = instantiate(cfg.data, **overrides)
    datamodule.setup("test" if split == "all" else "validate")
    entries = datamodule.entries("test" if split == "all" else split)
    loader = datamodule.loader("test" if split == "all" else split)

    if cfg.compile:
        model.backbone.compile()
    trainer = L.Trainer(accelerator="auto", devices=1, precision=cfg.precision, logger=False,
                        enable_progress_bar=True, enable_checkpointing=False)
    probs = torch.cat(trainer.predict(model, dataloaders=loader)).numpy()
    what = "all images" if split == "all" else f"{split} split"
    return write_report(
        Path(cfg.paths.output_dir),
        title=f"leukonet: {datamodule.name} {what}, {model.hparams.backbone}",
        y_true=[e.label for e in entries],
        probs=probs,
        paths=[str(datamodule.path_of(e)) for e in entries],
        class_names=model.hparams.class_names,
        extra={
            "dataset": datamodule.name,
            "split": split,
            "citation": datamodule.citation,
            "checkpoint": str(ckpt),
            "backbone": model.hparams.backbone,
            "weights": model.weights_source,
            "command": command("leukonet.evaluate"),
            "machine": machine(),
            "wall_s": round(time.perf_counter() - started, 1),
            "data_summary": datamodule.summary(),
        },
        explain=explainer(model),
        # the checkpoint's temperature and review threshold (fitted on its validation split; T = 1 and none
        # for checkpoints from before calibration)
        calibration={"temperature": float(model.temperature), "review_threshold": model.chosen_review_threshold()},
    )


@hydra.main(version_base="1.3", config_path=CONF, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
