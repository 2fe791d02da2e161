"""leukonet against the report's fastai recipe: same machine, split, augmentation, backbone and weights.

    python experiments/bench_fastai/bench.py [--data DIR] [--out DIR] [--work DIR] [--quick]
    python experiments/bench_fastai/bench.py fastai --data DIR --split split.csv --json FILE [...]

The first form (``run``, the default) runs, one after the other, as separate processes:

1. ``python -m leukonet.train +experiment=two_phase_lite0 data.root=DIR`` (it writes ``split.csv``);
2. this script's ``fastai`` half on the same images with that ``split.csv``;

measures each process's wall time and peak memory, and writes ``results.json`` and ``results.md``.
With ``--split FILE`` both halves use that split; ``--only HALF`` runs one half and keeps its measurements
in ``--work``, so a later call with the same options runs the other half and writes the results.

The fastai half is the report's recipe written with fastai's own API (``Learner``, ``create_head``,
``freeze``/``unfreeze``, ``EarlyStoppingCallback``, ``SaveModelCallback``), with the parts that must
match taken from leukonet so that only the training code differs:

* backbone ``tf_efficientnet_lite0`` built by timm and filled by ``leukonet.training.weights.load_pretrained``
  (the packaged ImageNet weights), cut and headed as ``vision_learner`` does for a timm model
  (``TimmBody`` + ``add_head``: concat pooling, BN, dropout 0.25/0.5, 512 hidden), split into
  body/head with fastai's ``default_split``; normalisation with the weights' own mean and std (0.5);
* images decoded and resized with ``leukonet.data.folder.load_rgb``, then augmented by leukonet's
  own albumentations pipeline (``conf/data/augment/report.yaml``, built by Hydra as leukonet builds
  it) inside a fastai item transform: both see the same distribution of augmentations;
* ``learn.freeze(); learn.fit(30, 1e-3, cbs=[EarlyStopping(valid_loss, patience 8), SaveModel(valid_loss)])``
  then ``learn.unfreeze(); learn.fit(60, 1e-5, same callbacks)``: leukonet's phase limits
  (``conf/callbacks/default.yaml``). fastai's defaults are kept: BatchNorm layers of the frozen body
  keep training (``train_bn=True``, running statistics updated), Adam with decoupled weight decay
  0.01, fp32 (fastai's mixed precision is CUDA-only), fastai's DataLoader worker count.
"""


import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BACKBONE = "tf_efficientnet_lite0"
EXPERIMENT = "two_phase_lite0"
REPORT_ACCURACY = 371 / 375  # the report's test accuracy (98.93 %), issue 3's accuracy target
MAX_WALL_TIME_RATIO = 0.5  # issue 3: leukonet's wall time at most half of fastai's, at equal or better accuracy


CORE = ("torch", "torchvision", "numpy", "lightning", "timm", "albumentations", "pillow", "opencv-python-headless")


def versions(names=CORE + ("fastai", "fastcore", "fasttransform")) -> dict:
    """Installed versions of the packages both halves depend on (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def default_data() -> str:
    return str(Path(os.environ.get("LEUKONET_DATA", str(REPO.parent / "shared" / "data"))) / "pbc-2500")


# ============================================================================ the fastai half


def leukonet_augment(image_size: int) -> tuple:
    """leukonet's train and eval albumentations pipelines, composed from conf/ exactly as a run of
    +experiment=two_phase_lite0 composes them (Hydra), at ``image_size``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from leukonet.data.transforms import eval_transform, train_transform
    from leukonet.train import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"+experiment={EXPERIMENT}", f"data.image_size={image_size}"])
    augment = instantiate(cfg.data.augment, _convert_="all")
    return train_transform(augment, image_size), eval_transform(image_size), cfg


def run_fastai(args: argparse.Namespace) -> dict:
    """The report's recipe in fastai; returns (and writes to --json) its measurements."""
    t_start = time.perf_counter()
    import numpy as np
    import pandas as pd
    import timm
    import torch
    from fastai.callback.core import Callback
    from fastai.callback.tracker import EarlyStoppingCallback, SaveModelCallback
    from fastai.data.block import CategoryBlock, DataBlock
    from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor, Normalize
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    from fastai.torch_core import TensorImage, find_bs, set_seed
    from fastai.vision.data import ImageBlock
    from fastai.vision.core import PILImage
    from fastai.vision.learner import TimmBody, add_head, default_split
    from fasttransform import DisplayedTransform
    from omegaconf import OmegaConf

    import fastai
    from leukonet.classes import CLASSES
    from leukonet.data.folder import load_rgb
    from leukonet.data.split import read_split
    from leukonet.inference.report import compute_metrics
    from leukonet.training.weights import load_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed, reproducible=False)
    root, size = Path(args.data), args.image_size
    train_tf, eval_tf, cfg = leukonet_augment(size)

    # -- data: leukonet's split file, leukonet's decoder, leukonet's augmentation -----------------
    t_fit = time.perf_counter()
    splits = read_split(args.split)
    rows = [(e.path, CLASSES[e.label], s) for s in ("train", "val", "test") for e in splits[s]]
    df = pd.DataFrame(rows, columns=["path", "label", "split"])
    df["is_valid"] = df["split"] == "val"
    fit_df = df[df["split"] != "test"].reset_index(drop=True)
    test_df = df[df["split"] == "test"].reset_index(drop=True)

    def load(path: str) -> np.ndarray:  # decoded every epoch, as fastai does; resized as leukonet does
        return load_rgb(root / path, size)

    class LeukonetAlbumentations(DisplayedTransform):
        """leukonet's albumentations pipeline on the decoded cell: the train one on the training
        set, the eval one (resize only) on validation and test. Each call reseeds the pipeline from
        numpy's generator, which fastai seeds per DataLoader worker, so workers never repeat each
        other's augmentations."""

        split_idx, order = None, 2  # after PILImage.create, before ToTensor

        def __init__(self, train, valid):
            super().__init__()
            self.train, self.valid, self.idx = train, valid, 1

        def before_call(self, b, split_idx):
            self.idx = split_idx

        def encodes(self, img: PILImage):
            tf = self.train if self.idx == 0 else self.valid
            if self.idx == 0:
                tf.set_random_seed(int(np.random.randint(0, 2**31 - 1)))
            return TensorImage(tf(image=np.array(img))["image"])  # uint8 CHW

    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=list(CLASSES))),
        get_x=lambda r: load(r["path"]),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=[LeukonetAlbumentations(train_tf, eval_tf)],
        batch_tfms=[IntToFloatTensor()],
    )
    dl_kw = {} if args.workers is None else {"num_workers": args.workers}
    dls = block.dataloaders(fit_df, bs=args.batch_size, device=torch.device("cpu"), **dl_kw)

    # -- model: timm backbone + leukonet's weights, cut and headed as vision_learner does -----------
    net = timm.create_model(BACKBONE, pretrained=False)
    weights = load_pretrained(net, BACKBONE)
    mean, std = net.pretrained_cfg["mean"], net.pretrained_cfg["std"]
    net.reset_classifier(0)
    body = TimmBody(net, pretrained=True, cut=None, n_in=3)
    model = add_head(body, net.num_features, len(CLASSES), init=torch.nn.init.kaiming_normal_, head=None,
                     concat_pool=True, pool=body.needs_pool, lin_ftrs=None, ps=0.5, first_bn=True,
                     bn_final=False, lin_first=False, y_range=None)
    dls.add_tfms([Normalize.from_stats(mean, std)], "after_batch")  # as vision_learner's _timm_norm

    class Meter(Callback):
        """Seconds per epoch and training images seen, per fit (= per phase)."""

        order = -10  # before the trackers, which may cancel the fit in their after_epoch

        def before_fit(self):
            self.epoch_s, self.images, self.t0 = [], 0, time.perf_counter()

        def before_epoch(self):
            self.t = time.perf_counter()

        def after_batch(self):
            if self.training:
                self.images += find_bs(self.yb)

        def after_epoch(self):
            self.epoch_s.append(time.perf_counter() - self.t)

        def after_fit(self):
            self.fit_s = time.perf_counter() - self.t0

    meter = Meter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    learn = Learner(dls, model, splitter=default_split, metrics=[accuracy], path=work, model_dir="models",
                    train_bn=True, cbs=[meter])
    phases = {}
    for phase, (epochs, lr) in enumerate(((args.epochs1, args.lr1), (args.epochs2, args.lr2)), start=1):
        if phase == 1:
            learn.freeze()
        else:
            learn.unfreeze()
        cbs = [EarlyStoppingCallback(monitor="valid_loss", patience=args.patience),
               SaveModelCallback(monitor="valid_loss", fname=f"best_phase{phase}")]
        learn.fit(epochs, lr, cbs=cbs)
        saver = cbs[1]
        phases[f"phase{phase}"] = {
            "epochs": len(meter.epoch_s),
            "max_epochs": epochs,
            "lr": lr,
            "wall_s": round(meter.fit_s, 2),
            "epoch_s": [round(s, 2) for s in meter.epoch_s],
            "train_images": meter.images,
            "best_valid_loss": float(saver.best),
            "history": [[float(v) if v is not None else None for v in vals] for vals in learn.recorder.values],
        }
    fit_s = time.perf_counter() - t_fit

    # -- test split, metrics as leukonet computes them ------------------------------------------------
    test_dl = dls.test_dl(test_df, with_labels=True)
    probs, targets = learn.get_preds(dl=test_dl)
    metrics = compute_metrics(targets.numpy(), probs.numpy(), list(CLASSES))
    images = sum(p["train_images"] for p in phases.values())
    phase_s = sum(p["wall_s"] for p in phases.values())
    out = {
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_balanced_accuracy": metrics["balanced_accuracy"],
        "test_n": metrics["n"],
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "epochs": {"phase1": phases["phase1"]["epochs"], "phase2": phases["phase2"]["epochs"],
                   "total": phases["phase1"]["epochs"] + phases["phase2"]["epochs"]},
        "phases": phases,
        "train_images": images,
        "phases_s": round(phase_s, 2),
        "images_per_s": images / phase_s if phase_s else None,
        "fit_s": round(fit_s, 2),
        "inner_wall_s": round(time.perf_counter() - t_start, 2),
        "n": {"train": len(splits["train"]), "val": len(splits["val"]), "test": len(splits["test"])},
        "weights": f"{weights.kind}: {weights.location}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "normalisation": {"mean": list(mean), "std": list(std)},
        "augmentation": "leukonet's albumentations train transform (conf/data/augment/report.yaml via Hydra) "
                        "in a fastai item transform, reseeded per call from numpy's per-worker generator",
        "augment_config": OmegaConf.to_container(cfg.data.augment, resolve=True),
        "image_size": size,
        "batch_size": args.batch_size,
        "num_workers": dls.train.fake_l.num_workers,
        "torch_threads": torch.get_num_threads(),
        "precision": "fp32",
        "train_bn": True,
        "fastai": fastai.__version__,
        "versions": versions(),
        "python": sys.executable,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"fastai: test accuracy {out['test_accuracy']:.4f}, macro-F1 {out['test_macro_f1']:.4f}, epochs "
          f"{out['epochs']['phase1']}+{out['epochs']['phase2']}, {out['images_per_s']:.1f} training images/s")
    return out


# ============================================================================ the orchestrator


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy (all but idle and iowait), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` to completion with output to ``log``; wall time, peak RSS (the process, from
    wait4) and peak RSS summed over its process tree (DataLoader workers included; sampled)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_tree = [0]
    busy0, own0 = _machine_busy_s(), os.times()
    with open(log, "w") as f:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample():
            if psutil is None:
                return
            while not done.wait(0.5):
                try:
                    p = psutil.Process(proc.pid)
                    rss = sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])
                    peak_tree[0] = max(peak_tree[0], rss)
                except (psutil.Error, OSError):
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        proc.returncode = os.waitstatus_to_exitcode(status)
    busy1, own1 = _machine_busy_s(), os.times()
    others = None
    if busy0 is not None and busy1 is not None and wall > 0:
        mine = usage.ru_utime + usage.ru_stime + (own1.user + own1.system) - (own0.user + own0.system)
        others = round(max(0.0, 100 * ((busy1 - busy0) - mine) / (wall * (os.cpu_count() or 1))), 1)
    return {
        "command": shlex.join(cmd),
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
        "peak_tree_rss_mib": round(peak_tree[0] / 2**20, 1) if psutil else None,
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "other_processes_cpu_pct": others,
        "log": str(log),
    }


def measured_once(cmd: list[str], work: Path, name: str, env: dict, done: Path, label: str = "") -> dict:
    """``measure`` the half ``name`` unless an earlier call with the same --work finished it (its
    measurements are kept in WORK/NAME.proc.json): an interrupted full run resumes at the other half."""
    record = work / f"{name}.proc.json"
    if record.is_file() and done.is_file():
        old = json.loads(record.read_text())
        if old.get("command") != shlex.join(cmd):
            raise SystemExit(f"{record}: the {name} half finished there was run as\n  {old.get('command')}\nnot as\n  "
                             f"{shlex.join(cmd)}\ncall again with the options of that run, or choose another --work")
        if old.get("returncode") == 0:
            print(f"[bench_fastai] {name}: reusing the finished run in {work} (measured {old['finished']})", flush=True)
            return {**old, "reused": True}
    print(f"[bench_fastai] {label or name}: {shlex.join(cmd)}", flush=True)
    from leukonet.provenance import machine

    result = {**measure(cmd, work / f"{name}.log", env), "finished": datetime.now().isoformat(timespec="seconds"),
              "machine": machine()}
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def phase_times_from_log(log: Path) -> dict:
    """Seconds per phase of a leukonet run from the two-phase callback's log lines (Hydra's train.log
    timestamps them): phase 1 from its start to 'phase 1 ends', phase 2 from there to 'phase 2 ends'."""
    stamps = {}
    pattern = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\].*\[two-phase\] (phase 1: backbone frozen|phase 1 ends|phase 2 ends)")
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            if m := pattern.search(line):
                stamps.setdefault(m.group(2), datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"))
    out = {}
    if {"phase 1: backbone frozen", "phase 1 ends"} <= set(stamps):
        out["phase1"] = (stamps["phase 1 ends"] - stamps["phase 1: backbone frozen"]).total_seconds()
    if {"phase 1 ends", "phase 2 ends"} <= set(stamps):
        out["phase2"] = (stamps["phase 2 ends"] - stamps["phase 1 ends"]).total_seconds()
    return out


def leukonet_summary(run_dir: Path, proc: dict, batch_size: int) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    n_train = metrics["data_summary"]["total"]["train"]
    per_epoch = (n_train // batch_size) * batch_size if n_train > batch_size else n_train  # drop_last
    epochs = metrics["epochs"]
    phase_s = phase_times_from_log(run_dir / "train.log")
    images = per_epoch * epochs["total"]
    timed = sum(phase_s.values()) if len(phase_s) == 2 else metrics["fit_s"]
    return {
        **proc,
        "test_accuracy": metrics["accuracy"],
        "test_macro_f1": metrics["macro_f1"],
        "test_balanced_accuracy": metrics["balanced_accuracy"],
        "test_n": metrics["n"],
        "epochs": epochs,
        "final_weights": metrics.get("final_weights"),
        "phases_s": {k: round(v, 2) for k, v in phase_s.items()} or None,
        "phases_timed_from": "train.log timestamps of the two-phase callback" if len(phase_s) == 2 else "metrics.json fit_s (log lines not found)",
        "train_images": images,
        "images_per_s": images / timed if timed else None,
        "fit_s": metrics["fit_s"],
        "inner_wall_s": metrics["wall_s"],
        "n": metrics["data_summary"]["total"],
        "weights": metrics["weights"],
        "machine": metrics["machine"],
        "image_size": metrics["image_size"],
        "run_dir": str(run_dir),
    }


def seconds_per_epoch(half: dict) -> dict:
    """Mean seconds an epoch (validation included) in each phase; fastai's from its fits, leukonet's from its log."""
    if "phases" in half:  # fastai
        times = {p: v["wall_s"] for p, v in half["phases"].items()}
    else:
        times = half.get("phases_s") or {}
    return {p: round(t / half["epochs"][p], 2) for p, t in times.items() if half["epochs"].get(p)}


def targets(leuk: dict, fa: dict, ratio: float) -> dict:
    """Issue 3's targets, each with the value, the bound, whether it is met and the gap (value - bound), and
    where the time went (seconds an epoch and epochs run per phase, in each half)."""
    acc = leuk["test_accuracy"]
    rows = {
        "accuracy_vs_report": (acc, REPORT_ACCURACY, acc >= REPORT_ACCURACY),
        "accuracy_vs_fastai": (acc, fa["test_accuracy"], acc >= fa["test_accuracy"]),
        "wall_time_ratio": (ratio, MAX_WALL_TIME_RATIO, ratio <= MAX_WALL_TIME_RATIO and acc >= fa["test_accuracy"]),
    }
    out = {k: {"value": v, "bound": b, "met": met, "gap": v - b} for k, (v, b, met) in rows.items()}
    lk_e, fa_e = seconds_per_epoch(leuk), seconds_per_epoch(fa)
    out["profile"] = {
        "seconds_per_epoch": {"leukonet": lk_e, "fastai": fa_e},
        "per_epoch_ratio": {p: round(lk_e[p] / fa_e[p], 3) for p in lk_e if fa_e.get(p)},
        "epochs": {"leukonet": leuk["epochs"], "fastai": fa["epochs"]},
    }
    return out


def run_both(args: argparse.Namespace) -> dict:
    from leukonet.provenance import machine, portable_text

    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    work = Path(args.work or REPO / "outputs" / "bench_fastai" / stamp).resolve()
    out = Path(args.out).resolve()
    data = Path(args.data).resolve() if args.data else None
    size, e1, e2 = (64, 1, 2) if args.quick else (args.image_size, args.max_epochs1, args.max_epochs2)
    capped = not args.quick and (e1, e2) != (30, 60)
    if args.quick and data is None:  # a tiny synthetic set, generated once per work dir
        from leukonet.data.synthetic import generate_dataset

        data = generate_dataset(work / "cells", n_per_class=args.quick_n, size=96, seed=0)
    if data is None or not data.is_dir():
        raise SystemExit(f"--data {data}: no such folder (set LEUKONET_DATA, or pass --data DIR with DIR/<class>/*.jpg)")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's intra-op threads in both processes
    py = sys.executable
    run_dir = work / "leukonet"
    leuk_cmd = [py, "-m", "leukonet.train", f"+experiment={EXPERIMENT}", f"data.root={data}", f"hydra.run.dir={run_dir}",
                f"data.image_size={size}", f"data.batch_size={args.batch_size}", f"seed={args.seed}"]
    if args.quick or capped:
        leuk_cmd += [f"callbacks.two_phase.phase1.max_epochs={e1}", f"callbacks.two_phase.phase2.max_epochs={e2}"]
    split = Path(args.split).resolve() if args.split else run_dir / "split.csv"
    if args.split:
        if not split.is_file():
            raise SystemExit(f"--split {split}: no such file (a leukonet split.csv: path,label,split)")
        leuk_cmd.append(f"data.split_file={split}")
    elif args.only == "fastai" and not (work / "leukonet.proc.json").is_file():
        raise SystemExit("--only fastai needs a split: pass --split FILE (a leukonet split.csv of the same data and "
                         "seed, e.g. experiments/two_phase/split.csv), or run the leukonet half first")
    leuk = None
    if args.only != "fastai":
        if run_dir.exists() and not (work / "leukonet.proc.json").is_file():  # an interrupted run: start afresh
            aside = work / f"leukonet.interrupted-{stamp}"
            run_dir.rename(aside)
            print(f"[bench_fastai] moved the unfinished leukonet run to {aside}", flush=True)
        leuk = measured_once(leuk_cmd, work, "leukonet", env, done=run_dir / "metrics.json", label="leukonet half")
        if leuk["returncode"] != 0:
            raise SystemExit(f"leukonet failed (exit {leuk['returncode']}); see {leuk['log']}")
    fa_json = work / "fastai.json"
    fa_cmd = [args.fastai_python or py, str(Path(__file__).resolve()), "fastai", "--data", str(data), "--split", str(split),
              "--json", str(fa_json), "--work", str(work / "fastai"), "--image-size", str(size),
              "--batch-size", str(args.batch_size), "--epochs1", str(e1), "--epochs2", str(e2), "--seed", str(args.seed)]
    if args.threads:
        fa_cmd += ["--threads", str(args.threads)]
    if args.workers is not None:
        fa_cmd += ["--workers", str(args.workers)]
    fa = None
    if args.only != "leukonet":
        fa = measured_once(fa_cmd, work, "fastai", env, done=fa_json, label="fastai half")
        if fa["returncode"] != 0:
            raise SystemExit(f"fastai failed (exit {fa['returncode']}); see {fa['log']}")
    if leuk is None or fa is None:
        print(f"[bench_fastai] --only {args.only}: that half is measured and kept in {work}; for the other half and "
              f"the results, call again with the same options and --work, without --only", flush=True)
        return {"only": args.only, "work_dir": str(work), args.only: leuk or fa}
    fastai_res = {**fa, **json.loads(fa_json.read_text())}
    leuk_res = leukonet_summary(run_dir, leuk, args.batch_size)
    ratio = leuk["wall_s"] / fa["wall_s"]
    res = {
        "quick": args.quick,
        "capped": capped,
        "targets": targets(leuk_res, fastai_res, ratio),
        "leukonet": leuk_res,
        "fastai": fastai_res,
        "wall_time_ratio": ratio,
        "wall_time_ratio_means": "leukonet process wall time / fastai process wall time (each: start-up, data, "
                                 "both phases, test; leukonet also validates the final model and writes its report)",
        "data": str(data),
        "split_file": str(split),
        "image_size": size,
        "batch_size": args.batch_size,
        "phase_limits": {"phase1": {"max_epochs": e1, "lr": 1e-3, "patience": 8},
                         "phase2": {"max_epochs": e2, "lr": 1e-5, "patience": 8}},
        "machine": machine(),
        "machine_per_half": {"leukonet": leuk.get("machine"), "fastai": fa.get("machine")},  # None: not recorded
        "threads_requested": args.threads,
        "versions": {"leukonet": versions(CORE), "fastai": fastai_res["versions"]},
        "same_core_versions": all(versions(CORE)[k] == fastai_res["versions"].get(k) for k in CORE),
        "command": shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *sys.argv[1:]]),
        "work_dir": str(work),
        "differences": [
            "precision: leukonet trains in bf16 autocast where the CPU has native bf16 (trainer.precision="
            "${best_precision:}) and runs channels-last; fastai trains in fp32, contiguous (its mixed precision is CUDA-only)",
            "data: leukonet decodes every image once and keeps it in memory; fastai decodes each image every epoch "
            "(with leukonet's decoder), in its default number of DataLoader workers",
            "frozen body: leukonet keeps the backbone's BatchNorm statistics fixed (eval mode) in phase 1 and, by default, "
            "in phase 2; fastai's default train_bn=True trains BatchNorm scale, shift and running statistics in the frozen body",
            "final weights: leukonet keeps phase 1's best weights if phase 2 never beats them; fastai keeps phase 2's best",
            "optimiser: leukonet AdamW(betas 0.9/0.99, weight decay 0.01); fastai Adam(0.9/0.99, eps 1e-5, decoupled "
            "weight decay 0.01), both at a constant rate per phase",
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(portable_text(json.dumps(res, indent=2) + "\n", REPO))
    write_markdown(res, out / "results.md")
    print(f"[bench_fastai] wall time leukonet {leuk['wall_s']:.0f} s, fastai {fa['wall_s']:.0f} s, ratio "
          f"{res['wall_time_ratio']:.2f}; results in {out}/results.{{json,md}}")
    return res


def target_lines(t: dict) -> list[str]:
    """results.md's targets table, and where the time went."""
    def row(what, key, fmt):
        r = t[key]
        return f"| {what} | {fmt(r['value'])} | {fmt(r['bound'])} | {'yes' if r['met'] else '**no**'} | {fmt(r['gap'], True)} |"

    def acc(x, signed=False):
        return f"{100 * x:+.2f} points" if signed else f"{100 * x:.2f} %"

    def ratio(x, signed=False):
        return f"{x:+.3f}" if signed else f"{x:.3f}"

    prof = t["profile"]
    lk_e, fa_e, lk_n, fa_n = (prof["seconds_per_epoch"]["leukonet"], prof["seconds_per_epoch"]["fastai"],
                              prof["epochs"]["leukonet"], prof["epochs"]["fastai"])
    per_epoch = "; ".join(f"phase {p[-1]}: {lk_e[p]:.1f} s against {fa_e[p]:.1f} s ({r:.2f})"
                          for p, r in prof["per_epoch_ratio"].items())
    return ["## Targets (issue 3)", "", "| target | value | bound | met | gap |", "|---|---:|---:|:---:|---:|",
            row("leukonet test accuracy at least the report's (371/375)", "accuracy_vs_report", acc),
            row("leukonet test accuracy at least fastai's", "accuracy_vs_fastai", acc),
            row(f"wall_time_ratio at most {MAX_WALL_TIME_RATIO} (at equal or better accuracy)", "wall_time_ratio", ratio), "",
            f"Where the time went: seconds an epoch, validation included, leukonet against fastai: {per_epoch}. "
            f"Epochs run, phase 1 + phase 2: leukonet {lk_n['phase1']} + {lk_n['phase2']}, fastai {fa_n['phase1']} + "
            f"{fa_n['phase2']} (early stopping sets them, in each half on its own validation losses).", ""]


def write_markdown(res: dict, path: Path) -> None:
    from leukonet.provenance import portable_text

    lk, fa = res["leukonet"], res["fastai"]

    def pct(x):
        return "—" if x is None else f"{100 * x:.2f} %"

    def num(x, nd=1):
        return "—" if x is None else f"{x:,.{nd}f}"

    lphase = lk.get("phases_s") or {}
    rows = [
        ("test accuracy", pct(lk["test_accuracy"]), pct(fa["test_accuracy"])),
        ("test macro-F1", num(lk["test_macro_f1"], 4), num(fa["test_macro_f1"], 4)),
        ("test balanced accuracy", pct(lk["test_balanced_accuracy"]), pct(fa["test_balanced_accuracy"])),
        ("test images", str(lk["test_n"]), str(fa["test_n"])),
        ("epochs phase 1 + phase 2", f"{lk['epochs']['phase1']} + {lk['epochs']['phase2']}",
         f"{fa['epochs']['phase1']} + {fa['epochs']['phase2']}"),
        ("phase 1 wall s", num(lphase.get("phase1")), num(fa["phases"]["phase1"]["wall_s"])),
        ("phase 2 wall s", num(lphase.get("phase2")), num(fa["phases"]["phase2"]["wall_s"])),
        ("training images / s (both phases, validation included)", num(lk["images_per_s"]), num(fa["images_per_s"])),
        ("process wall s", num(lk["wall_s"]), num(fa["wall_s"])),
        ("peak RSS MiB (process)", num(lk["peak_rss_mib"], 0), num(fa["peak_rss_mib"], 0)),
        ("peak RSS MiB (process tree, sampled)", num(lk["peak_tree_rss_mib"], 0), num(fa["peak_tree_rss_mib"], 0)),
        ("CPU s (user + system)", num(lk["cpu_s"], 0), num(fa["cpu_s"], 0)),
        ("other processes' share of the CPU meanwhile", num(lk.get("other_processes_cpu_pct")) + " %",
         num(fa.get("other_processes_cpu_pct")) + " %"),
    ]
    lim = res["phase_limits"]
    title = "leukonet against the report's fastai recipe" + (" (--quick smoke test on synthetic cells, not a measurement)" if res["quick"] else "")
    if res.get("capped"):
        title += f" (capped at {lim['phase1']['max_epochs']} + {lim['phase2']['max_epochs']} epochs)"
    lines = [f"# {title}", "",
             f"- Data: `{res['data']}`; split: leukonet's `split.csv` (train {lk['n']['train']}, val {lk['n']['val']}, "
             f"test {lk['n']['test']}), the same lists fed to fastai",
             f"- Backbone `{BACKBONE}`, {res['image_size']} px, batch {res['batch_size']}; weights: {fa['weights']}",
             f"- Machine: {res['machine']}",
             f"- fastai {fa['fastai']}, torch {fa['torch']}, timm {fa['timm']}; fastai: {fa['torch_threads']} torch threads, "
             f"{fa['num_workers']} DataLoader workers; core package versions identical in both halves: "
             f"{res['same_core_versions']}",
             f"- Command: `{res['command']}`", "",
             ]
    busy = max(lk.get("other_processes_cpu_pct") or 0, fa.get("other_processes_cpu_pct") or 0)
    if res.get("capped"):
        lines += [f"**Capped run: each phase stops after at most {lim['phase1']['max_epochs']} and "
                  f"{lim['phase2']['max_epochs']} epochs (the recipe: 30 and 60, patience 8), in both halves. The wall "
                  "times compare the same number of epochs of the same recipe; the accuracies are those of a short "
                  "budget, not of the full recipe.**", ""]
    if busy > 10:
        lines += [f"**Warning: other processes used up to {busy:.0f} % of the machine's CPU time during this run; "
                  "the wall times, images/s and their ratio are not the software's. Rerun on an idle machine.**", ""]
    per_half = {h: m for h, m in res.get("machine_per_half", {}).items() if m}
    if len(set(per_half.values())) > 1:
        lines += ["**Warning: the two halves ran on different machines (" + "; ".join(f"{h}: {m}" for h, m in per_half.items())
                  + "); their times do not compare.**", ""]
    reused = [h for h, r in (("leukonet", lk), ("fastai", fa)) if r.get("reused")]
    if reused:
        lines += [f"({' and '.join(reused)}: measured by an earlier call with the same --work, "
                  "on the machine named above.)", ""]
    lines += ["| | leukonet | fastai (report's recipe) |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", f"**wall_time_ratio = {res['wall_time_ratio']:.3f}** ({res['wall_time_ratio_means']}).", ""]
    lines += target_lines(res["targets"])
    lines += ["Phase times: leukonet from its log's timestamps (" + lk["phases_timed_from"] + "); fastai from "
              "each `learn.fit`. Training images / s = images trained on in both phases / time in the two phases.", "",
              "## What differs, on purpose", ""]
    lines += [f"- {d}" for d in res["differences"]]
    lines += ["", "## Commands run", "", f"- leukonet: `{lk['command']}`", f"- fastai: `{fa['command']}`", ""]
    path.write_text(portable_text("\n".join(lines), REPO))


# ============================================================================ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    both = sub.add_parser("run", help="leukonet then fastai, measured (the default)")
    both.add_argument("--data", default=None, help="DIR/<class>/*.jpg (default: $LEUKONET_DATA or ../shared/data, "
                      "+ /pbc-2500; with --quick: generated synthetic cells)")
    both.add_argument("--out", default=str(HERE), help="where results.json and results.md go (default: %(default)s)")
    both.add_argument("--work", help="run directories, checkpoints and logs (default: outputs/bench_fastai/<date>_<time>)")
    both.add_argument("--quick", action="store_true", help="smoke test: synthetic cells, 64 px, 1 + 2 epochs")
    both.add_argument("--quick-n", type=int, default=16, help="synthetic cells per class with --quick")
    both.add_argument("--image-size", type=int, default=224)
    both.add_argument("--batch-size", type=int, default=32)
    both.add_argument("--threads", type=int, help="torch threads for both (default: torch's own choice, as leukonet)")
    both.add_argument("--workers", type=int, help="fastai DataLoader workers (default: fastai's)")
    both.add_argument("--seed", type=int, default=42)
    both.add_argument("--max-epochs1", type=int, default=30, help="phase-1 epoch limit in both halves (recipe: 30)")
    both.add_argument("--max-epochs2", type=int, default=60, help="phase-2 epoch limit in both halves (recipe: 60); "
                      "lower limits make a capped run, labelled as such in the results")
    both.add_argument("--split", help="a leukonet split.csv (path,label,split) both halves use (leukonet: data.split_file); "
                      "default: the one leukonet's run writes, which the fastai half then reads")
    both.add_argument("--only", choices=("leukonet", "fastai"), help="run this half and stop; a later call with the same "
                      "options and --work, without --only, runs the other half and writes the results (the full run "
                      "takes longer than some sessions; --only fastai needs --split)")
    both.add_argument("--fastai-python", help="interpreter for the fastai half (default: this one); run.sh "
                      "passes .venv-fastai's where fastai could not go into .venv unchanged")
    fa = sub.add_parser("fastai", help="only the fastai half, on a given split file")
    fa.add_argument("--data", required=True)
    fa.add_argument("--split", required=True, help="a leukonet split.csv (path,label,split)")
    fa.add_argument("--json", help="write the measurements here")
    fa.add_argument("--work", default=str(REPO / "outputs" / "bench_fastai" / "fastai"), help="fastai's model dir parent")
    fa.add_argument("--quick", action="store_true")
    fa.add_argument("--image-size", type=int, default=224)
    fa.add_argument("--batch-size", type=int, default=32)
    fa.add_argument("--epochs1", type=int, default=30)
    fa.add_argument("--epochs2", type=int, default=60)
    fa.add_argument("--lr1", type=float, default=1e-3)
    fa.add_argument("--lr2", type=float, default=1e-5)
    fa.add_argument("--patience", type=int, default=8)
    fa.add_argument("--threads", type=int)
    fa.add_argument("--workers", type=int)
    fa.add_argument("--seed", type=int, default=42)
    if not argv or argv[0] not in ("run", "fastai", "-h", "--help"):
        argv = ["run", *argv]
    args = p.parse_args(argv)
    if args.mode == "run" and args.data is None and not args.quick:
        args.data = default_data()
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    return run_fastai(args) if args.mode == "fastai" else run_both(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # leukonet from this checkout, also without an editable install
    main()
