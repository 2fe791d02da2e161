"""Adapt a trained checkpoint to a new lab and write the adapted checkpoint with a report of what changed.

The steps, each set by the method (``conf/method/``): BatchNorm statistics (``bn``: none, adabn or map,
``leukonet.adapt.batchnorm``); the whole network tuned (``network``: on the lab's labelled cells, or TENT's
entropy on its unlabelled ones, ``leukonet.adapt.network``); the head re-fitted on the lab's labelled and/or confident cells with the
training cells kept in the mix (``self_train``, ``leukonet.adapt.head``); the lab's class mix estimated by EM
and, with ``prior: true``, applied (``leukonet.adapt.label_shift``). Then the calibration (refitted on the
lab's labelled cells when there are enough) and the not-a-leukocyte statistics (class means of the training
cells, threshold on the lab's cells) are renewed. The result is an ordinary checkpoint: ``evaluate``,
``predict``, ``serve`` and ``export`` read it unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from leukonet.adapt import batchnorm, head, label_shift, network
from leukonet.adapt.cells import Cells, copies_of_training, read_labels, source_cells, target_cells
from leukonet.data.folder import decode_many
from leukonet.errors import DataError, RunExistsError
from leukonet.inference import ood
from leukonet.inference.calibration import calibrate
from leukonet.inference.cell_kind import IMAGE_SIZE, PROFILE_KEY, CellKind
from leukonet.provenance import command, machine
from leukonet.training.checkpoint_io import AtomicCheckpointIO
from leukonet.training.model import CellClassifier

BN_MODES = ("none", "adabn", "map")
PROFILE_CELLS = 300  # the lab's cells the not-a-leukocyte profile is measured on, at most


def probabilities(model, feats: torch.Tensor) -> np.ndarray:
    """Calibrated probabilities (temperature and prior shift applied) from pooled features."""
    return torch.softmax(head.logits(model, feats) / model.temperature, 1).numpy()


def adapt_model(model: CellClassifier, train: Cells, target: Cells, labels: np.ndarray, method: DictConfig | dict,
                min_labelled: int = 25, target_accuracy: float = 0.995, seed: int = 0) -> tuple[dict, dict]:
    """Adapt ``model`` in place to the lab whose cells are ``target`` (``labels``: -1 where unlabelled), ``train``
    being the checkpoint's training cells. Returns what changed (the report's content) and the renewed
    not-a-leukocyte statistics."""
    method = OmegaConf.create(dict(method)) if not isinstance(method, DictConfig) else method
    t0 = time.perf_counter()
    model.eval()
    before_feats = ood.features(model, target.images)
    before = probabilities(model, before_feats)
    adapt_batchnorm(model, train, target, str(method.get("bn", "none")), center=method.get("bn_center"))
    bn_s = time.perf_counter() - t0
    tuned = tune_network(model, train, target, labels, method, seed)
    net_s = time.perf_counter() - t0 - bn_s
    changed = method.get("bn", "none") != "none" or tuned["objective"] != "none"
    tgt = ood.features(model, target.images) if changed else before_feats
    src = ood.features(model, train.images)
    summary, stats = fit_to_lab(model, (src, train.labels), tgt, labels, method, before, min_labelled, target_accuracy, seed)
    summary["network"] = tuned
    summary["timings"] = {"batchnorm_s": round(bn_s, 1), "network_s": round(net_s, 1),
                          "total_s": round(time.perf_counter() - t0, 1)}
    return summary, stats


def adapt_batchnorm(model: CellClassifier, train: Cells, target: Cells, bn: str, moments: dict | None = None,
                    center: float | None = None) -> None:
    """The BatchNorm step: ``none``, ``adabn`` (the lab's statistics) or ``map`` (the lab's moments mapped onto the
    training cells': ``moments``, ``batchnorm.input_moments`` of the unadapted model with the same ``center``,
    measured here if not given; ``center``: moments over the central share of each feature map)."""
    if bn not in BN_MODES:
        raise DataError(f"method.bn must be one of {BN_MODES}, got {bn!r}")
    if bn == "adabn":
        batchnorm.adabn(model, target.images)
    elif bn == "map":
        batchnorm.map_to_source(model, target.images, moments or batchnorm.input_moments(model, train.images, center), center)


def tune_network(model: CellClassifier, train: Cells, target: Cells, labels: np.ndarray, method: DictConfig,
                 seed: int = 0) -> dict:
    """The whole-network step (``leukonet.adapt.network``): the method's ``network`` entry, none by default."""
    cfg = network.NetworkTuning(**OmegaConf.to_container(method.get("network") or OmegaConf.create({}), resolve=True))
    return network.tune(model, (train.images, train.labels), target.images, labels, cfg, seed)


def fit_to_lab(model: CellClassifier, source: tuple[torch.Tensor, np.ndarray], tgt: torch.Tensor, labels: np.ndarray,
               method: DictConfig, before: np.ndarray, min_labelled: int = 25, target_accuracy: float = 0.995,
               seed: int = 0, refit_ood: bool = True) -> tuple[dict, dict | None]:
    """The steps after BatchNorm, on the backbone's features (``source``: training features and labels; ``tgt``: the
    lab's): the head, the calibration, the class mix, the not-a-leukocyte statistics (unless ``refit_ood`` is
    false: a benchmark that scores no such flag). ``before``: the lab's probabilities before any step, for the report."""
    src, src_labels = source
    n_classes = len(model.hparams.class_names)
    cfg = head.SelfTraining(**OmegaConf.to_container(method.get("self_train") or {}, resolve=True))
    rounds = head.fit(model, (src, src_labels), tgt, labels, cfg, seed)

    labelled = np.flatnonzero(labels >= 0)
    if len(labelled) >= min_labelled:
        fitted = calibrate(head.logits(model, tgt[torch.as_tensor(labelled)]), labels[labelled], target_accuracy)
        model.temperature.fill_(fitted["temperature"])
        model.review_threshold.fill_(fitted["review_threshold"])
        calibration = {"refitted_on": f"{len(labelled)} labelled cells of the lab (they also trained the head: "
                                      "the fit is optimistic)", **fitted}
    else:
        calibration = {"refitted_on": None, "temperature": float(model.temperature),
                       "review_threshold": model.chosen_review_threshold(),
                       "note": f"kept the checkpoint's (fitted on the training lab's validation cells): "
                               f"{len(labelled)} labelled cells of the lab, {min_labelled} needed to refit"}

    train_prior = np.bincount(src_labels, minlength=n_classes) / len(src_labels)
    estimate = label_shift.em_prior(probabilities(model, tgt), train_prior)
    if method.get("prior", False):
        model.log_prior_shift.copy_(torch.as_tensor(label_shift.log_shift(estimate, train_prior, float(model.temperature))))
    after = probabilities(model, tgt)

    stats = None
    if refit_ood:
        stats = ood.fit(src, src_labels.tolist(), n_classes)
        distances = ood.distance(tgt, stats).numpy()
        stats.update(threshold=torch.tensor(float(np.quantile(distances, ood.ACCEPT, method="higher"))),
                     accept=torch.tensor(ood.ACCEPT), n_train=torch.tensor(len(src)), n_val=torch.tensor(len(tgt)))

    names = list(model.hparams.class_names)

    def mix(p: np.ndarray) -> dict[str, float]:
        return {c: float(v) for c, v in zip(names, np.bincount(p.argmax(1), minlength=n_classes) / len(p))}

    return {
        "method": OmegaConf.to_container(method, resolve=True),
        "cells": len(tgt), "labelled": int(len(labelled)),
        "class_mix_before": mix(before), "class_mix_after": mix(after),
        "estimated_proportions": {c: float(v) for c, v in zip(names, estimate)},
        "training_proportions": {c: float(v) for c, v in zip(names, train_prior)},
        "prior_applied": bool(method.get("prior", False)),
        "mean_confidence_before": float(before.max(1).mean()), "mean_confidence_after": float(after.max(1).mean()),
        "changed_class": int((before.argmax(1) != after.argmax(1)).sum()),
        "self_training": rounds, "calibration": calibration,
        "ood_threshold": {"from": f"{ood.ACCEPT:.0%} of the lab's cells accepted",
                          "value": float(stats["threshold"]) if stats else None},
    }, stats


def adapt(cfg: DictConfig) -> dict:
    """``python -m leukonet.adapt``: check every input, adapt, write ``adapted.ckpt`` and ``adaptation.{json,md}``."""
    started = time.perf_counter()
    ckpt_path = Path(cfg.ckpt_path)
    if cfg.method.get("bn", "none") not in BN_MODES:
        raise DataError(f"method.bn must be one of {BN_MODES}, got {cfg.method.get('bn')!r}")
    objective = (cfg.method.get("network") or {}).get("objective", "none")
    if objective not in network.OBJECTIVES:
        raise DataError(f"method.network.objective must be one of {network.OBJECTIVES}, got {objective!r}")
    if not ckpt_path.is_file():
        raise DataError(f"ckpt_path={ckpt_path} does not exist")
    out_dir = Path(cfg.paths.output_dir)
    out = Path(cfg.output) if cfg.get("output") else out_dir / "adapted.ckpt"
    if out.exists():
        raise RunExistsError(f"{out} exists; adaptation never writes over a checkpoint: choose output=... or hydra.run.dir=...")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if ckpt.get("hyper_parameters", {}).get("stain_norm"):
        raise DataError(f"{ckpt_path} normalises stains ({ckpt['hyper_parameters']['stain_norm']}, fitted on the training "
                        "lab's images inside the model): adapt supports checkpoints without model.stain_norm; retrain "
                        "without it (+experiment=stain_robust does) and adapt that")
    model = CellClassifier.from_checkpoint(ckpt_path)
    size = model.hparams.image_size
    target = target_cells(cfg.target, size, int(cfg.min_cells))
    labels = read_labels(cfg.target.labels, target) if cfg.target.get("labels") else np.full(len(target), -1, np.int64)
    train = source_cells(cfg.source, ckpt_path, size)
    copies = copies_of_training(target, train)
    if copies > len(target) // 2:
        raise DataError(f"target {cfg.target.root or cfg.target.manifest}: {copies} of its {len(target)} cells are the "
                        "checkpoint's own training cells; adaptation is for another lab's cells")
    summary, stats = adapt_model(model, train, target, labels, cfg.method, int(cfg.calibration.min_labelled),
                          float(cfg.calibration.target_accuracy), int(cfg.seed))
    profile = lab_profile(target.paths, int(cfg.seed))
    summary.update(checkpoint=str(ckpt_path), adapted=str(out), target=str(cfg.target.root or cfg.target.manifest),
                   labels=cfg.target.get("labels"), unreadable=target.unreadable, copies_of_training=copies,
                   cell_kind_profile_cells=profile[1], command=command("leukonet.adapt"), machine=machine(),
                   wall_s=round(time.perf_counter() - started, 1))
    state = {**ckpt, "state_dict": model.state_dict(), ood.KEY: stats, PROFILE_KEY: profile[0],
             "adaptation": json.loads(json.dumps(summary))}  # plain data: weights_only loading reads it
    for key in ("optimizer_states", "lr_schedulers", "callbacks", "loops"):  # not a run to resume
        state.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(state, out)
    write_report(out_dir, summary)
    return summary


def lab_profile(paths: list[Path], seed: int = 0) -> tuple[torch.Tensor, int]:
    """The lab's profile for the not-a-leukocyte check (``leukonet.inference.cell_kind``: the median cell-kind features of
    its cells with a nucleus), stored in the adapted checkpoint so that ``predict`` and ``serve`` use it on runs too
    small to measure their own; and how many cells it was measured on: at most ``PROFILE_CELLS``, drawn with
    ``seed`` (a median settles long before; measuring all of 1,000 cells took 43 s of a 2-core machine)."""
    if len(paths) > PROFILE_CELLS:
        paths = [paths[i] for i in sorted(np.random.default_rng(seed).choice(len(paths), PROFILE_CELLS, replace=False))]
    images = [im for im in decode_many(paths, IMAGE_SIZE) if not isinstance(im, str) and ood.has_leukocyte(im)]
    if not images:
        raise DataError("none of the target's cells shows a nucleus to the cell finder: are these leukocytes?")
    return torch.from_numpy(CellKind.profile(CellKind.features(images))).float(), len(images)


def network_line(tuned: dict) -> str:
    """The report's line on the whole-network step."""
    if tuned.get("objective", "none") == "none":
        return "not tuned"
    if tuned.get("skipped"):
        return f"not tuned ({tuned['skipped']})"
    what = "fine-tuned on" if tuned["objective"] == "labels" else "BatchNorm scale and shift tuned (entropy) on"
    return f"{what} {tuned['cells']} cells, {tuned['steps']} steps, loss {tuned['loss_first']} -> {tuned['loss_last']}"


def write_report(out_dir: Path, summary: dict) -> None:
    """``adaptation.json`` and ``adaptation.md`` in ``out_dir``, and the same table on the terminal."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adaptation.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    names = list(summary["class_mix_before"])
    rows = [(c, summary["class_mix_before"][c], summary["class_mix_after"][c], summary["estimated_proportions"][c],
             summary["training_proportions"][c]) for c in names]
    cal = summary["calibration"]
    lines = ["# leukonet: adaptation to a new lab", "",
             f"Checkpoint `{summary['checkpoint']}` adapted to the {summary['cells']} cells of `{summary['target']}` "
             f"({summary['labelled']} labelled) with `{json.dumps(summary['method'])}`: `{summary['adapted']}`.", "",
             "| class | predicted before | predicted after | estimated share (EM) | training share |",
             "|---|---:|---:|---:|---:|",
             *(f"| {c} | {b:.1%} | {a:.1%} | {e:.1%} | {t:.1%} |" for c, b, a, e, t in rows), "",
             f"- cells whose class changed: {summary['changed_class']} of {summary['cells']}",
             f"- mean confidence: {summary['mean_confidence_before']:.3f} before, {summary['mean_confidence_after']:.3f} after",
             f"- class mix correction (EM estimate applied to the posteriors): {'yes' if summary['prior_applied'] else 'no, reported only'}",
             f"- calibration: temperature {cal['temperature']:.3g}, review threshold "
             f"{cal['review_threshold'] if cal['review_threshold'] is None else format(cal['review_threshold'], '.7g')}; "
             + (f"refitted on {cal['refitted_on']}" if cal["refitted_on"] else cal["note"]),
             f"- not-a-leukocyte threshold: {summary['ood_threshold']['from']}",
             f"- whole network: {network_line(summary.get('network') or {})}",
             f"- self-training rounds: {json.dumps(summary['self_training'])}",
             f"- unreadable files skipped: {len(summary['unreadable'])}",
             f"- wall time {summary['wall_s']} s on {summary['machine']}", "",
             f"Command: `{summary['command']}`", ""]
    (out_dir / "adaptation.md").write_text("\n".join(lines), encoding="utf-8")
    table = Table(title=f"Adapted to {summary['cells']} cells ({summary['labelled']} labelled): {summary['changed_class']} changed class")
    for col in ("class", "before", "after", "EM estimate"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for c, b, a, e, _ in rows:
        table.add_row(c, f"{b:.1%}", f"{a:.1%}", f"{e:.1%}")
    console = Console()
    console.print(table)
    console.print(f"adapted checkpoint: {summary['adapted']}\nreport: {out_dir / 'adaptation.md'}")
