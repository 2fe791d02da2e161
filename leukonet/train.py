"""Train: ``python -m leukonet.train +experiment=two_phase [key=value ...]``.

Composes data, model, callbacks, loggers and trainer from ``conf/``, fits both phases, measures
the final model on validation (the value a sweep optimises) and test, and writes the report.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from leukonet.errors import DataError, RunExistsError, exit_on_user_error
from leukonet.inference import ood
from leukonet.inference.calibration import calibrate
from leukonet.inference.explain import explainer
from leukonet.inference.report import read_history, write_report
from leukonet.provenance import command, machine, portable_path
from leukonet.training.checkpoint_io import update_checkpoints
from leukonet.training.distributed import job_processes
from leukonet.training.finetune import TwoPhaseFinetuning

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def check_run_dir(output_dir: Path, resuming: bool) -> None:
    """Never train over an earlier run's results silently."""
    if not resuming and any((output_dir / name).exists() for name in ("checkpoints", "metrics.json")):
        raise RunExistsError(
            f"{output_dir} already holds a run; choose another directory (hydra.run.dir=...) "
            f"or resume it with ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'}"
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; return the final model's validation and test metrics."""
    output_dir = Path(cfg.paths.output_dir)
    check_run_dir(output_dir, resuming=cfg.ckpt_path is not None)
    if cfg.ckpt_path == "last":
        with open_dict(cfg):
            cfg.ckpt_path = str(output_dir / "checkpoints" / "last.ckpt")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise DataError(f"cannot resume: ckpt_path={cfg.ckpt_path} does not exist (resume a run with "
                             f"hydra.run.dir=<its directory> ckpt_path=last)")
    L.seed_everything(cfg.seed, workers=True)
    started = time.perf_counter()

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    loggers = [instantiate(lg) for lg in cfg.logger.values() if lg is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    fit_s, fit_epochs = time.perf_counter() - started, trainer.current_epoch

    # the two-phase callback restored the best weights by validation loss: that is the final model
    metrics = {k: float(v) for k, v in trainer.validate(model, datamodule=datamodule, verbose=False)[0].items()}
    calibration = _calibrate(cfg, model, datamodule)
    _store_in_checkpoints(trainer, calibration, ood.compute(model, datamodule) if trainer.is_global_zero else None)
    if cfg.test:
        metrics.update({k: float(v) for k, v in trainer.test(model, datamodule=datamodule, verbose=False)[0].items()})
        if trainer.is_global_zero:
            _report(cfg, trainer, model, datamodule, callbacks, fit_epochs, fit_s, time.perf_counter() - started,
                    calibration)
            print_next_steps(output_dir, metrics)
    return metrics


def print_next_steps(output_dir: Path, metrics: dict[str, float]) -> None:
    """Where the run's report, checkpoint and logs are, and the commands to try next with its checkpoint."""
    run = portable_path(output_dir)
    ckpt = f"{run}/checkpoints/last.ckpt"
    try:  # the interpreter that ran this: the project's .venv/bin/python after `make run`
        py = Path(sys.executable).relative_to(Path.cwd()).as_posix()
    except ValueError:
        py = "python"
    table = Table.grid(padding=(0, 2))
    table.add_row("report", f"{run}/report.md (test accuracy {metrics.get('test/acc', float('nan')):.1%}; "
                            "metrics.json, figures, predictions.csv beside it)")
    table.add_row("checkpoint", f"{ckpt} (best by validation loss: checkpoints/best.ckpt)")
    table.add_row("TensorBoard", f"{run}/tensorboard: make tensorboard, or tensorboard --logdir {run}/tensorboard")
    table.add_row("", "")
    table.add_row("predict", f"{py} -m leukonet.predict ckpt_path={ckpt} input={run}/predictions.csv  "
                             "# the test cells; or input=FILE_OR_DIR")
    table.add_row("review station", f"{py} -m leukonet.serve ckpt_path={ckpt}  # then open http://127.0.0.1:8000/")
    table.add_row("evaluate", f"{py} -m leukonet.evaluate ckpt_path={ckpt} data.root=DIR  # any folder of <class>/ images")
    Console().print(Panel(table, title=f"run finished: {run}", title_align="left", expand=False))


def _store_in_checkpoints(trainer, calibration: dict, ood_stats: dict | None) -> None:
    """Write the temperature, the review threshold and the not-a-leukocyte feature statistics (``leukonet.inference.ood``:
    class means and precision on the training split, threshold on validation) into the run's best and last
    checkpoints, each loaded and saved once, by process 0."""
    def edit(ckpt: dict) -> None:
        for key in ("temperature", "review_threshold"):
            if key in calibration:
                ckpt["state_dict"][key] = torch.tensor(float(calibration[key]))
        if ood_stats is not None:
            ckpt[ood.KEY] = {k: v.detach().cpu() for k, v in ood_stats.items()}

    if trainer.is_global_zero:
        paths = [p for cb in trainer.checkpoint_callbacks for p in (cb.best_model_path, cb.last_model_path)]
        update_checkpoints(paths, edit, trainer.strategy.checkpoint_io)
    trainer.strategy.barrier("checkpoints updated")


def _calibrate(cfg, model, datamodule) -> dict:
    """Fit the temperature and the review threshold on the final model's validation logits (every process
    alike) and keep them in the model."""
    labels = [e.label for e in datamodule.entries("val")]
    if not labels:  # no validation split: nothing to fit on; temperature 1, no threshold
        return {}
    target = float(OmegaConf.select(cfg, "review.target_accuracy", default=0.995))
    values = calibrate(torch.cat(model.val_logits), labels, target)
    model.temperature.fill_(values["temperature"])
    model.review_threshold.fill_(values["review_threshold"])
    return values


def _report(cfg, trainer, model, datamodule, callbacks, fit_epochs: int, fit_s: float, wall_s: float,
            calibration: dict) -> None:
    output_dir = Path(cfg.paths.output_dir)
    two_phase = next((c for c in callbacks if isinstance(c, TwoPhaseFinetuning)), None)
    csv_logs = [lg for lg in trainer.loggers if isinstance(lg, L.pytorch.loggers.CSVLogger)]
    # the CSV also holds the final validate/test rows: keep the training epochs
    history = [h for h in read_history(Path(csv_logs[0].log_dir) / "metrics.csv") if h["epoch"] < fit_epochs] if csv_logs else None
    test_entries = datamodule.entries("test")
    boundary = two_phase.boundary_epoch if two_phase else None
    extra = {
        "dataset": datamodule.name,
        "split": "test",
        "citation": datamodule.citation,
        "command": command("leukonet.train"),
        "machine": machine(),
        "backbone": model.hparams.backbone,
        "weights": model.weights_source or "random initialisation",
        "image_size": model.hparams.image_size,
        "epochs": {"total": fit_epochs, "phase1": boundary, "phase2": fit_epochs - boundary if boundary else None},
        "final_weights": two_phase.final_weights if two_phase else "last epoch",
        "wall_s": round(wall_s, 1),
        "fit_s": round(fit_s, 1),
        "data_summary": datamodule.summary(),
        "checkpoint": portable_path(output_dir / "checkpoints" / "last.ckpt"),
    }
    write_report(
        output_dir,
        title=f"leukonet: {datamodule.name} test split, {model.hparams.backbone}",
        y_true=[e.label for e in test_entries],
        probs=torch.cat(model.test_probs).numpy(),
        paths=[str(datamodule.path_of(e)) for e in test_entries],
        class_names=model.hparams.class_names,
        history=history,
        extra=extra,
        explain=explainer(model),
        calibration={"temperature": calibration["temperature"], "review_threshold": calibration["review_threshold"],
                     "validation": calibration} if calibration else None,
    )


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float | None:
    with job_processes():  # under DDP (trainer=ddp) each job of a sweep starts and ends its own processes
        metrics = exit_on_user_error(lambda: train(cfg))
    return metrics.get(cfg.optimized_metric) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
