"""Under the fine-tuning floor the command re-fits only the head on a lab's few labelled cells. On the short-budget
source no such row (1-5 a class, random or suggested) reached BCCD's balanced accuracy without adaptation (``typical_picks.json``):
the labelled cells fill half of every batch, so 5 cells weigh as much as the 500 training cells. Which head fit
makes a few labels help, or at least not hurt? Variants of ``leukonet.adapt.head._fit`` patched in, same pools,
held-out halves and picks (random k of each class; the command's ``rank``) as ``experiments/adapt/bench.py``:

- ``half``: the command's (the target's cells half of each batch, a labelled cell drawn ``label_weight`` = 4 times
  as often as a pseudo-labelled one);
- ``share``: the target's share of each batch proportional to its weight, a labelled cell counting as
  ``label_weight`` training cells (25 labelled: 100 of 600, a sixth of each batch);
- ``anchor``: ``half`` with an L2 pull of the head's weights towards the checkpoint's (L2-SP, Li et al. 2018);
- ``steps30``: ``half`` with 30 steps instead of 150;
- ``distill``: ``half``, the training cells taught the checkpoint's own answers (soft, KL: learning without
  forgetting, Li and Hoiem 2016) instead of their labels: a re-fit on their clean features alone moved the head off
  what augmentation taught it (BCCD 64 -> 23 % accuracy with no target cell at all: ``source_refit.py``); ``distill_share``: with
  ``share``'s batches;
- ``augsrc``: ``half`` with the training cells' features taken from one view of each augmented as in training
  (``source_refit.augmented_features``) instead of their clean features; under the floor only (the network unchanged).

    python experiments/adapt/probes/head_fit.py outputs/adapt/source-short-seed0/checkpoints/last.ckpt
    # k = 10 (41 labelled: every layer fine-tuned first, as the command does; then each head fit)
    python experiments/adapt/probes/head_fit.py outputs/adapt/source-short-seed0/checkpoints/last.ckpt --ks 10 --variants half share distill
    python experiments/adapt/probes/head_fit.py outputs/adapt/source-short-seed0/checkpoints/last.ckpt --variants half augsrc --out head_fit_augsrc.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench import (METHODS, Adapted, backbone_step, data_folder, ood, probabilities, setting,  # noqa: E402
                   target_halves, write_probe)
from leukonet.adapt import head  # noqa: E402
from leukonet.adapt.cells import per_class  # noqa: E402
from leukonet.adapt.suggest import rank  # noqa: E402
from leukonet.classes import CLASSES  # noqa: E402
from source_refit import augmented_features  # noqa: E402


def variant_fit(mode: str, anchor: float = 1.0):
    def fit(model, source, target, labels, cfg, rounds, g):
        src_x, src_y = source[0].clone(), torch.as_tensor(source[1])
        start = [p.detach().clone() for p in model.head.parameters()]
        model.head.eval()
        with torch.no_grad():
            src_p = torch.softmax(model.head(src_x).float(), 1)  # the checkpoint's own answers on the training cells
        optimizer = torch.optim.AdamW(model.head.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.01)
        chosen = np.flatnonzero(labels >= 0)
        weight = torch.full((len(chosen),), cfg.label_weight, dtype=torch.float64)
        tgt_x, tgt_y = target[torch.as_tensor(chosen)].clone(), torch.as_tensor(labels[chosen])
        n_tgt = cfg.batch
        if mode.endswith("share"):
            n_tgt = max(1, round(cfg.batch * float(weight.sum()) / len(src_x)))
        steps = 30 if mode == "steps30" else cfg.steps
        model.head.train()
        with torch.enable_grad():
            for _ in range(steps):
                i = torch.randint(len(src_x), (cfg.batch,), generator=g)
                j = torch.multinomial(weight, n_tgt, replacement=True, generator=g)
                out = model.head(torch.cat([src_x[i], tgt_x[j]])).float()
                if mode.startswith("distill"):
                    loss = (F.kl_div(F.log_softmax(out[: len(i)], 1), src_p[i], reduction="batchmean")
                            + F.cross_entropy(out[len(i):], tgt_y[j]))
                else:
                    loss = F.cross_entropy(out, torch.cat([src_y[i], tgt_y[j]]))
                if mode == "anchor":
                    loss = loss + anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.head.parameters(), start))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.head.eval()
        return [{"round": 1, "labelled": len(chosen), "target_per_batch": n_tgt}]
    return fit


VARIANTS = {"half": None, "share": variant_fit("share"), "anchor": variant_fit("anchor"), "steps30": variant_fit("steps30"),
            "distill": variant_fit("distill"), "distill_share": variant_fit("distill_share"), "augsrc": None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt", type=Path)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "augsrc"], choices=list(VARIANTS))
    p.add_argument("--out", default=None, help="the JSON's name (default head_fit_k<ks>.json)")
    args = p.parse_args()
    ckpt, data, seeds, ks = args.ckpt, data_folder(args.data), (0, 1, 2), args.ks
    started = time.perf_counter()
    model, source, pbc = setting(ckpt, data)
    method = METHODS["finetune"]
    original = head._fit
    augmented = augmented_features(model, source, ckpt) if "augsrc" in args.variants else None
    rows: dict[str, dict[str, list[dict]]] = {}
    for name, seed, pool, test in target_halves(data, model.hparams.image_size, seeds):
        free = Adapted(model, source, pool, test, pbc, backbone_step(method), probabilities(model, ood.features(model, pool.images)), {})
        probs = probabilities(free.model, free.on)
        rows.setdefault(name, {}).setdefault("none", []).append(free.row(method, np.full(len(pool), -1), seed))
        for k in ks:
            budget = sum(min(k, int((pool.labels == c).sum())) for c in range(len(CLASSES)))
            for strategy, chosen in (("random", per_class(pool.labels, k, seed)), ("suggest", np.array(rank(free.on, probs, budget, seed)))):
                labels = np.full(len(pool), -1)
                labels[chosen] = pool.labels[chosen]
                tuned = backbone_step(method, labelled=True)  # from 30 labelled cells: every layer, as the command
                on = Adapted(model, source, pool, test, pbc, tuned, free.before, {}, labels, seed) if (labels >= 0).sum() >= 30 else free
                for variant in args.variants:
                    if variant == "augsrc" and on is not free:
                        continue
                    fit, clean = VARIANTS[variant], on.source
                    head._fit = fit or original
                    if variant == "augsrc":
                        on.source = (augmented, clean[1])
                    try:
                        row = on.row(method, labels, seed)
                    finally:
                        head._fit, on.source = original, clean
                    key = f"k{k}/{strategy}/{variant}"
                    rows[name].setdefault(key, []).append(row)
                    t = row["target"]
                    print(f"{name} seed {seed} {key}: accuracy {t['accuracy']:.3f}, balanced {t['balanced_accuracy']:.3f}, "
                          f"PBC {row['pbc_test']['accuracy']:.3f}", flush=True)
    write_probe(HERE / (args.out or f"head_fit_k{'_'.join(map(str, ks))}.json"), ckpt, seeds, rows, started)


if __name__ == "__main__":
    main()
