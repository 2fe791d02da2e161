"""Evaluate a trained model on any folder: ``python -m leukonet.evaluate ckpt_path=... data.root=DIR``.

Without ``data.split_file`` every image under ``data.root`` is scored (an external set); with it,
one split of that file (``split=test`` by default). Writes the same report as training.

Several named datasets at once: ``+domains.NAME.root=DIR`` (or ``.manifest=CSV``, with optional
``.split_file`` and ``.split``) for each; every domain gets its report in ``NAME/`` and the run directory
``domains.json`` / ``domains.md``: one row per domain and the worst one (lowest balanced accuracy).
``tta=flips|d4`` averages the probabilities over flipped / rotated copies (``leukonet.inference.tta``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from leukonet.data.folder import load_rgb
from leukonet.errors import DataError, exit_on_user_error
from leukonet.inference import ood
from leukonet.inference.cell_kind import CellKind
from leukonet.inference.explain import explainer
from leukonet.inference.report import confusion_table, write_report
from leukonet.inference.tta import TTAPredictor, average, check_mode
from leukonet.predict import wants_kind_check
from leukonet.provenance import command, machine
from leukonet.train import CONF
from leukonet.training.model import CellClassifier


def evaluate(cfg: DictConfig) -> dict:
    """Score the checkpoint on the chosen images and write report.md, metrics.json and figures; with
    ``domains``, one report per domain and the comparison (returns the content of domains.json)."""
    started = time.perf_counter()
    ckpt = Path(cfg.ckpt_path)
    if not ckpt.is_file():
        raise DataError(f"ckpt_path={ckpt} does not exist")
    try:
        tta = check_mode(cfg.get("tta"))
    except ValueError as err:
        raise DataError(str(err)) from err
    with open_dict(cfg):  # auto resolved (and a bad value refused) before any work
        cfg.kind_check = wants_kind_check(cfg.get("kind_check", "auto"), ckpt)
    model = CellClassifier.from_checkpoint(ckpt)
    if cfg.compile:
        model.backbone.compile()
    out = Path(cfg.paths.output_dir)
    domains = cfg.get("domains") or {}
    if not domains:
        return _evaluate_one(cfg, model, ckpt, tta, {}, cfg.split, out, started)
    results = {}
    for name, domain in domains.items():
        domain = domain or {}
        unknown = sorted(set(domain) - DOMAIN_KEYS)
        if unknown:
            raise DataError(f"domains.{name}: unknown key(s) {unknown}; use {sorted(DOMAIN_KEYS)}")
        if not domain.get("root") and not domain.get("manifest"):
            raise DataError(f"domains.{name}: give its images, +domains.{name}.root=DIR or +domains.{name}.manifest=CSV")
        data = {"root": domain.get("root"), "manifest": domain.get("manifest"), "split_file": domain.get("split_file"),
                "citation": domain.get("citation"), "output_dir": str(out / str(name))}
        results[str(name)] = _evaluate_one(cfg, model, ckpt, tta, data, domain.get("split"), out / str(name),
                                           time.perf_counter(), domain=str(name))
    return write_domains(out, results, model.hparams.class_names, extra={
        "checkpoint": str(ckpt), "tta": tta, "command": command("leukonet.evaluate"),
        "wall_s": round(time.perf_counter() - started, 1)})


DOMAIN_KEYS = {"root", "manifest", "split_file", "split", "citation"}


def _evaluate_one(cfg: DictConfig, model: CellClassifier, ckpt: Path, tta: str, data: dict,
                  split: str | None, out: Path, started: float, domain: str | None = None) -> dict:
    """One dataset's report in ``out``: ``cfg.data`` with ``data`` overriding it (``domain``: its name in
    ``domains``, shown in the title)."""
    split_file = data.get("split_file", cfg.data.split_file)
    split = split or ("test" if split_file else "all")
    overrides = {**data, "image_size": model.hparams.image_size, "augment": None, "eval_batch_size": cfg.batch_size}
    if split == "all":
        if split_file:
            raise DataError("split=all scores every image under data.root: drop data.split_file, or name a split")
        overrides["split_fractions"] = (0.0, 0.0, 1.0)
        overrides["duplicates"] = "off"  # one split: nothing can leak
    datamodule = instantiate(cfg.data, **overrides)
    datamodule.setup("test" if split == "all" else "validate")
    entries = datamodule.entries("test" if split == "all" else split)
    loader = datamodule.loader("test" if split == "all" else split)

    trainer = L.Trainer(accelerator="auto", devices=1, precision=cfg.precision, logger=False,
                        enable_progress_bar=True, enable_checkpointing=False)
    temperature = float(model.temperature)
    calibration = {"temperature": temperature, "review_threshold": model.chosen_review_threshold()}
    if tta == "none":
        probs = torch.cat(trainer.predict(model, dataloaders=loader)).numpy()
    else:  # per-view logits (N, V, C): each view's probabilities averaged, without and with the temperature
        logits = torch.cat(trainer.predict(TTAPredictor(model, tta), dataloaders=loader)).transpose(0, 1)
        probs = average(logits).numpy()
        calibration["probs"] = average(logits, temperature).numpy()
    what = "all images" if split == "all" else f"{split} split"
    paths = [str(datamodule.path_of(e)) for e in entries]
    check = {}
    if cfg.kind_check and not datamodule.is_synthetic:  # how many of these labelled leukocytes predict would leave
        # out of the count (the check knows real cells only: drawings are not checked)
        verdicts = ood.check_crops([load_rgb(p) for p in paths], CellKind())
        check = {"not_a_leukocyte": ood.summary(verdicts)}
    return write_report(
        out,
        title=f"leukonet: {domain + ': ' if domain else ''}{datamodule.name} {what}, {model.hparams.backbone}" + ("" if tta == "none" else f", tta={tta}"),
        y_true=[e.label for e in entries],
        probs=probs,
        paths=paths,
        class_names=model.hparams.class_names,
        extra={
            "dataset": datamodule.name,
            **({"domain": domain} if domain else {}),
            "split": split,
            "tta": tta,
            "citation": datamodule.citation,
            "checkpoint": str(ckpt),
            "backbone": model.hparams.backbone,
            "weights": model.weights_source,
            "command": command("leukonet.evaluate"),
            "machine": machine(),
            "wall_s": round(time.perf_counter() - started, 1),
            "data_summary": datamodule.summary(),
            **check,
        },
        explain=explainer(model),
        # the checkpoint's temperature and review threshold (fitted on its validation split; T = 1 and none
        # for checkpoints from before calibration)
        calibration=calibration,
    )


SUMMARY_KEYS = ("n", "accuracy", "balanced_accuracy", "macro_f1")


def write_domains(out: Path, results: dict[str, dict], class_names: list[str], extra: dict | None = None) -> dict:
    """``domains.json`` and ``domains.md`` in ``out``: per domain n, accuracy, balanced accuracy, macro-F1 and
    the confusion matrix, and ``worst_domain`` (lowest balanced accuracy). Returns the JSON's content."""
    rows = {name: {**{k: m.get(k) for k in SUMMARY_KEYS}, "dataset": m.get("dataset"), "split": m.get("split"),
                   "confusion_matrix": m["confusion_matrix"], "report": f"{name}/report.md"}
            for name, m in results.items()}
    scored = {n: r["balanced_accuracy"] for n, r in rows.items() if r["balanced_accuracy"] is not None}
    worst = min(scored, key=scored.get) if scored else None
    summary = {"worst_domain": worst, "domains": rows, "class_names": list(class_names), **(extra or {})}
    (out / "domains.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    lines = ["# leukonet: evaluation by domain", ""]
    if extra:
        lines += [f"Checkpoint `{extra.get('checkpoint')}`, test-time augmentation `{extra.get('tta')}`. "
                  "Model selection used the training run's own validation split only.", ""]
    lines += ["| Domain | Images | Accuracy | Balanced accuracy | Macro-F1 | Report |", "|---|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        mark = " (worst)" if name == worst else ""
        lines.append(f"| {name}{mark} | {r['n']} | {fmt(r['accuracy'])} | {fmt(r['balanced_accuracy'])} | "
                     f"{fmt(r['macro_f1'])} | [{r['report']}]({r['report']}) |")
    lines += ["", f"Worst domain (lowest balanced accuracy): **{worst}**", ""]
    for name, r in rows.items():
        lines += [f"## {name}: confusion matrix (rows true, columns predicted)", "",
                  *confusion_table(class_names, r["confusion_matrix"]), ""]
    (out / "domains.md").write_text("\n".join(lines), encoding="utf-8")
    return summary


@hydra.main(version_base="1.3", config_path=CONF, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    exit_on_user_error(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
