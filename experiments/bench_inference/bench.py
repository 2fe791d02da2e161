"""CPU inference throughput of a leukonet model, next to the limit this CPU's matrix units allow.

    .venv/bin/python experiments/bench_inference/bench.py [--ckpt RUN/checkpoints/last.ckpt] [--out DIR] [--quick]

What it measures (all on the CPU, model in eval mode, under ``torch.inference_mode``, channels-last
as the model itself runs, uint8 images in, logits out, the model's own normalisation included):

* images/s at batch 1 and batch 64, for fp32 and, where the CPU computes bf16 natively (the same
  test as ``leukonet/resolvers.py``: AVX512-BF16 or AMX in /proc/cpuinfo), bf16 autocast entered
  once per forward as Lightning does; warm-up, then timed repetitions: median, quartiles, min, max;
* the same in fp32 with ONNX Runtime (``fp32+onnxruntime``: the model exported as ``python -m
  leukonet.export`` does, at the benchmark's image size, run on the CPU with as many intra-op threads
  as torch uses), when onnxruntime is importable and ``--no-onnx`` is not given;
* the machine's matrix-multiply rate: a large square ``torch.matmul`` in fp32 (and bf16), best of
  several, in GFLOP/s (2 FLOPs per multiply-add);
* the model's FLOPs per image with ``torch.utils.flop_counter.FlopCounterMode``, which counts a
  multiply-add as 2 FLOPs and counts only convolutions and matrix products (batch norm, activations,
  padding, pooling and additions count 0);
* limit images/s = matmul GFLOP/s / GFLOP per image, and fraction_of_limit = measured / limit;
* where the fraction is under 0.6 (issue 3's target): three profiled batch-64 forwards per precision,
  its top operators by self CPU time and the time per kind of operator (depthwise, pointwise and
  dense convolutions, batch norm, activations, padding, copies and casts, ...).

Writes ``results.json`` and ``results.md`` into ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

# torch.compile in this process: its compile workers would otherwise count as "other processes"
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TARGET_FRACTION = 0.6  # issue 3's target
BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # as leukonet.resolvers.best_precision


# ----------------------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a leukonet checkpoint (loaded with weights_only=True); default: the "
                   "two_phase_lite0 config's model with the packaged ImageNet weights")
    p.add_argument("--out", default=str(HERE), help="where results.json and results.md go (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px images, few repetitions, small matmul")
    p.add_argument("--image-size", type=int, help="default: the checkpoint's (224 for the config), 64 with --quick")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice, as leukonet)")
    p.add_argument("--precisions", help="comma-separated from fp32,bf16 (default: fp32, plus bf16 where native)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled forward even below the target")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile rows (evaluate's compile=true; the backbone compiled in place)")
    p.add_argument("--no-onnx", action="store_true",
                   help="skip the ONNX Runtime row (fp32; on by default when onnxruntime is importable)")
    return p.parse_args(argv)


def native_bf16() -> bool:
    """True where the CPU has native bf16 (leukonet.resolvers.best_precision's test, CPU only)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return bool(BF16_FLAGS & set(flags))


def build_model(ckpt: str | None) -> tuple[nn.Module, dict]:
    from leukonet.training.model import CellClassifier

    if ckpt:
        model = CellClassifier.from_checkpoint(ckpt)
        init = f" (backbone initialised from {model.weights_source})" if model.weights_source else ""
        info = {"source": "checkpoint", "ckpt": str(ckpt), "weights": f"the trained checkpoint's{init}"}
    else:
        from hydra import compose, initialize_config_dir
        from hydra.utils import instantiate

        from leukonet.train import CONF

        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            cfg = compose(config_name="train", overrides=["+experiment=two_phase_lite0"])
        model = instantiate(cfg.model).eval()
        info = {
            "source": "config",
            "ckpt": None,
            "config": "conf/train.yaml +experiment=two_phase_lite0 (model group)",
            "weights": f"{model.weights_source} (ImageNet backbone, untrained 5-class head; throughput "
                       "does not depend on the weights' values)",
        }
    hp = model.hparams
    info.update({
        "backbone": hp["backbone"],
        "head": dict(hp["head"]),
        "num_classes": len(hp["class_names"]),
        "trained_image_size": hp["image_size"],
        "channels_last": hp["channels_last"],
        "parameters": sum(p.numel() for p in model.parameters()),
    })
    return model.eval(), info


def precision_ctx(precision: str):
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)


def spread(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    med = statistics.median(values)
    return {
        "median": med,
        "p25": q[0],
        "p75": q[2],
        "min": min(values),
        "max": max(values),
        "iqr_pct_of_median": 100 * (q[2] - q[0]) / med if med else None,
        "n": len(values),
    }


class OtherLoad:
    """CPU time that other processes used while this one ran, from /proc/stat: timings taken on a
    busy machine are too low, and this says by how much the machine was shared."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def pct(self) -> float | None:
        """Others' CPU seconds / (wall seconds x cores), in %."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return round(max(0.0, 100 * others / (wall * (os.cpu_count() or 1))), 1) if wall > 0 else None


# ----------------------------------------------------------------------------- the machine's limit


def matmul_gflops(dtype: torch.dtype, n: int, repeats: int) -> dict:
    """Best of ``repeats`` timed (n x n) @ (n x n) products; 2 n^3 FLOPs each."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    with torch.inference_mode():
        for _ in range(2):
            torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t)
    flops = 2 * n**3
    return {"n": n, "repeats": repeats, "best_s": min(times), "gflops": flops / min(times) / 1e9,
            "median_gflops": flops / statistics.median(times) / 1e9}


def copy_gbps(mib: int, repeats: int) -> dict:
    """Memory bandwidth seen by torch: best of ``repeats`` copies of a ``mib`` MiB fp32 tensor
    (bytes read + bytes written). A second roof for the memory-bound operators."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return {"mib": mib, "repeats": repeats, "gbps": 2 * src.numel() * 4 / min(times) / 1e9}


# ----------------------------------------------------------------------------- the model's work


def conv_kind(weight_shape) -> str:
    """depthwise (k x k, one input channel a group), pointwise (1 x 1) or dense convolution."""
    if len(weight_shape) != 4:
        return "conv (other)"
    _, cin_per_group, kh, kw = weight_shape
    if kh == kw == 1:
        return "conv pointwise 1x1"
    if cin_per_group == 1:
        return "conv depthwise"
    return "conv dense kxk"


def count_flops(model: nn.Module, size: int) -> dict:
    """FLOPs of one image with FlopCounterMode (multiply-add = 2 FLOPs), and per kind of layer."""
    from torch.utils.flop_counter import FlopCounterMode

    per_kind: dict[str, int] = defaultdict(int)

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            kind = "conv depthwise" if module.groups == module.in_channels > 1 else conv_kind(tuple(module.weight.shape))
            per_image = output.numel() // output.shape[0]
            per_kind[kind] += 2 * per_image * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            per_kind["linear (head)"] += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images(1, size))
    finally:
        for h in handles:
            h.remove()
    total = counter.get_total_flops()
    return {
        "flops_per_image": int(total),
        "gflops_per_image": total / 1e9,
        "counter": "torch.utils.flop_counter.FlopCounterMode",
        "multiply_add_counts_as": 2,
        "counted_ops": "convolution, mm/addmm/bmm (batch norm, activations, padding, pooling, additions: 0)",
        "by_kind_from_layer_shapes": dict(per_kind),
        "by_kind_total_check": int(sum(per_kind.values())),
    }


# ----------------------------------------------------------------------------- timing


def time_forward(model: nn.Module, precision: str, batch: int, size: int, warmup: int, reps: int, inner: int) -> dict:
    """``reps`` timed repetitions of ``inner`` forwards each, after ``warmup`` untimed forwards."""
    x = images(batch, size)
    with torch.inference_mode():
        for _ in range(warmup):
            with precision_ctx(precision):
                model(x)
        rates, latencies = [], []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                with precision_ctx(precision):
                    model(x)
            dt = (time.perf_counter() - t) / inner
            latencies.append(dt * 1e3)
            rates.append(batch / dt)
    return {"batch": batch, "warmup_forwards": warmup, "repetitions": reps, "forwards_per_repetition": inner,
            "images_per_s": spread(rates), "ms_per_forward": spread(latencies)}


def onnx_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))


def time_onnx(model: nn.Module, size: int, plan: dict, threads: int) -> dict:
    """fp32 with ONNX Runtime: the model exported by ``leukonet.export.to_onnx`` at ``size`` px, then batch 1 and 64
    timed as ``time_forward`` times PyTorch (uint8 images in, logits out, normalisation in the graph)."""
    import tempfile

    import numpy as np
    import onnx

    from leukonet.export import INPUT_NAME, to_onnx
    from leukonet.inference.onnx_runtime import session

    t0 = time.perf_counter()
    proto, exporter = to_onnx(copy.deepcopy(model), size=size)
    export_s = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(proto, f"{tmp}/model.onnx")
        sess = session(f"{tmp}/model.onnx", threads)
    x64 = images(64, size).numpy()
    with torch.inference_mode():
        ref = model(torch.from_numpy(x64)).numpy()
    d = {"export_s": export_s, "exporter": exporter, "intra_op_threads": threads,
         "max_abs_logit_diff_vs_torch_fp32": float(np.abs(sess.run(None, {INPUT_NAME: x64})[0] - ref).max())}
    for key, batch in (("batch1", 1), ("batch64", 64)):
        warmup, reps, inner = plan[key]
        feed = {INPUT_NAME: images(batch, size).numpy()}
        for _ in range(warmup):
            sess.run(None, feed)
        rates, latencies = [], []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(inner):
                sess.run(None, feed)
            dt = (time.perf_counter() - t) / inner
            latencies.append(dt * 1e3)
            rates.append(batch / dt)
        d[key] = {"batch": batch, "warmup_forwards": warmup, "repetitions": reps, "forwards_per_repetition": inner,
                  "images_per_s": spread(rates), "ms_per_forward": spread(latencies)}
    return d


# ----------------------------------------------------------------------------- where the time goes

_CASTS = {"aten::to", "aten::_to_copy"}


def _category(event) -> str:
    """Kind of work an event's self time belongs to: by the outermost aten operator above it."""
    chain, e = [], event
    while e is not None and e.name.startswith("aten::"):
        chain.append(e)
        e = e.cpu_parent
    if not chain:
        return f"other ({event.name})"
    if any(c.name in _CASTS for c in chain):
        return "dtype casts (uint8 input, bf16 autocast)"
    top = chain[-1]
    name = top.name
    if "conv" in name:
        shapes = top.input_shapes or []
        return conv_kind(shapes[1]) if len(shapes) > 1 else "conv (other)"
    if "batch_norm" in name:
        return "batch norm"
    if any(k in name for k in ("hardtanh", "relu", "clamp", "silu", "sigmoid")):
        return "activation (ReLU6)"
    if "pad" in name:
        return "padding (TF 'same')"
    if name in ("aten::add", "aten::add_"):
        return "residual add"
    if any(k in name for k in ("pool", "mean", "amax", "max", "cat")):
        return "pooling / concat"
    if any(k in name for k in ("linear", "addmm", "mm")):
        return "linear (head)"
    if any(k in name for k in ("copy", "contiguous", "clone", "empty", "to", "sub", "div")):
        return "input normalisation / layout copies"
    return f"other ({name})"


def profile_forward(model: nn.Module, precision: str, batch: int, size: int, flops: dict, top: int = 15,
                    warmup: int = 2, reps: int = 3) -> dict:
    """Self CPU time per operator and per kind of work, averaged over ``reps`` profiled forwards."""
    from torch.profiler import ProfilerActivity, profile

    x = images(batch, size)
    with torch.inference_mode():
        for _ in range(warmup):
            with precision_ctx(precision):
                model(x)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(reps):
                with precision_ctx(precision):
                    model(x)
        wall_ms = (time.perf_counter() - t) * 1e3 / reps
    events = [e for e in prof.events() if e.device_type.name == "CPU"]
    total_us = sum(e.self_cpu_time_total for e in events)
    by_cat: dict[str, float] = defaultdict(float)
    for e in events:
        by_cat[_category(e)] += e.self_cpu_time_total
    kind_flops = flops["by_kind_from_layer_shapes"]
    categories = []
    total_us /= reps
    by_cat = {k: v / reps for k, v in by_cat.items()}
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        f = kind_flops.get(cat, 0) * batch
        categories.append({
            "category": cat,
            "self_cpu_ms": us / 1e3,
            "pct_time": 100 * us / total_us if total_us else 0.0,
            "pct_flops": 100 * kind_flops.get(cat, 0) / flops["by_kind_total_check"] if flops["by_kind_total_check"] else 0.0,
            "achieved_gflops": f / (us / 1e6) / 1e9 if us and f else None,
        })
    table = prof.key_averages()
    ops = sorted(table, key=lambda a: -a.self_cpu_time_total)[:top]
    return {
        "precision": precision,
        "batch": batch,
        "profiled_forwards": reps,
        "profiled_forward_ms": total_us / 1e3,
        "profiled_wall_ms": wall_ms,
        "top_ops_by_self_cpu": [
            {"op": a.key, "self_cpu_ms": a.self_cpu_time_total / reps / 1e3,
             "pct": 100 * a.self_cpu_time_total / reps / total_us if total_us else 0.0, "calls": a.count // reps}
            for a in ops
        ],
        "by_category": categories,
    }


# ----------------------------------------------------------------------------- report


def _fmt(x, nd=1):
    return "—" if x is None else f"{x:,.{nd}f}"


def write_markdown(res: dict, path: Path) -> None:
    L = []
    title = "Inference throughput on the CPU" + (" (--quick smoke test, not a measurement)" if res["quick"] else "")
    L += [f"# {title}", ""]
    m = res["model"]
    L += [f"- Model: `{m['backbone']}`, {m['num_classes']} classes, head `{m['head']['kind']}`, "
          f"{m['parameters']:,} parameters; {m['source']}: {m['ckpt'] or m['config']}",
          f"- Weights: {m['weights']}",
          f"- Input: {res['image_size']} px uint8 images, channels-last, eval mode, `torch.inference_mode`",
          f"- Machine: {res['machine']}",
          f"- torch {res['torch']}, {res['threads']} threads; native bf16: {res['native_bf16']}; "
          f"load average before/after: {res['loadavg_before']} / {res['loadavg_after']}; other processes "
          f"used {_fmt(res['other_processes_cpu_pct'])} % of the CPU time during the run",
          f"- Command: `{res['command']}`", ""]
    if (res["other_processes_cpu_pct"] or 0) > 10:
        L += [f"**Warning: other processes used {res['other_processes_cpu_pct']} % of the machine's CPU time during "
              "this run; the timings below are too low and the spreads too wide. Rerun on an idle machine.**", ""]
    L += ["| precision | batch | images/s (median) | quartiles | min–max | ms / forward | limit images/s | fraction of limit |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p, d in res["precisions"].items():
        for key in ("batch1", "batch64"):
            t = d[key]
            s = t["images_per_s"]
            L.append(f"| {p} | {t['batch']} | {_fmt(s['median'])} | {_fmt(s['p25'])}–{_fmt(s['p75'])} | "
                     f"{_fmt(s['min'])}–{_fmt(s['max'])} | {_fmt(t['ms_per_forward']['median'], 2)} | "
                     f"{_fmt(d['limit_images_per_s'])} | {_fmt(d['fraction_of_limit_' + key], 3)} |")
    f = res["flops"]
    L += ["", f"Headline (`{res['headline_precision']}`, the precision leukonet picks on this machine): "
          f"**{_fmt(res['images_per_s_batch1'])} images/s at batch 1, {_fmt(res['images_per_s_batch64'])} "
          f"at batch 64, fraction_of_limit {res['fraction_of_limit']:.3f}** (batch 64; target {TARGET_FRACTION}). "
          f"Best: `{res['best']['variant']}`, {_fmt(res['best']['images_per_s_batch64'])} images/s at batch 64, "
          f"fraction {res['best']['fraction_of_limit']:.3f}"
          + "".join(f"; `{k}` compiles in {d['compile_s']} s" for k, d in res["precisions"].items() if "compile_s" in d)
          + "".join(f"; `{k}` exports in {d['export_s']} s ({d['exporter']}; {d['intra_op_threads']} intra-op "
                    "threads; largest logit difference from PyTorch fp32 at batch 64: "
                    f"{d['max_abs_logit_diff_vs_torch_fp32']:.1e})"
                    for k, d in res["precisions"].items() if "export_s" in d)
          + ".", ""]
    L += ["## The limit", "",
          f"- Model: {f['gflops_per_image']:.3f} GFLOP per image at {res['image_size']} px "
          f"({f['counter']}; a multiply-add counts as {f['multiply_add_counts_as']} FLOPs; counted: {f['counted_ops']}).",
          ]
    for p, mm in res["matmul"].items():
        L.append(f"- Matrix multiply, {p}: {mm['gflops']:,.1f} GFLOP/s (best of {mm['repeats']}, "
                 f"{mm['n']}x{mm['n']} @ {mm['n']}x{mm['n']}; median {mm['median_gflops']:,.1f})")
    L.append(f"- Memory copy: {res['memory']['gbps']:.1f} GB/s (read + write, {res['memory']['mib']} MiB fp32)")
    L += ["- limit images/s = matmul GFLOP/s / GFLOP per image; fraction_of_limit = measured images/s / limit. "
          "The limit treats every counted FLOP as if it ran at large-matmul speed and the uncounted "
          "operators as free: no model reaches it, it bounds from above.", ""]
    if res.get("profiles"):
        L += ["## Where the time goes", ""]
        for prof in res["profiles"]:
            L += [f"### {prof['precision']}, batch-{prof['batch']} forward under torch.profiler, mean of "
                  f"{prof['profiled_forwards']} ({prof['profiled_forward_ms']:.1f} ms of self CPU time in "
                  f"{prof['profiled_wall_ms']:.1f} ms wall, "
                  f"profiler overhead included; unprofiled median "
                  f"{res['precisions'][prof['precision']]['batch64']['ms_per_forward']['median']:.1f} ms)", "",
                  "| kind of work | self CPU ms | % time | % of counted FLOPs | achieved GFLOP/s |",
                  "|---|---:|---:|---:|---:|"]
            for c in prof["by_category"]:
                if c["pct_time"] < 0.5:
                    continue
                L.append(f"| {c['category']} | {c['self_cpu_ms']:.1f} | {c['pct_time']:.1f} | "
                         f"{c['pct_flops']:.1f} | {_fmt(c['achieved_gflops'])} |")
            L += ["", "Top operators by self CPU time:", "", "| op | self CPU ms | % | calls |", "|---|---:|---:|---:|"]
            for o in prof["top_ops_by_self_cpu"]:
                L.append(f"| `{o['op']}` | {o['self_cpu_ms']:.1f} | {o['pct']:.1f} | {o['calls']} |")
            L.append("")
        L += ["### Reading", ""] + [f"- {s}" for s in res["analysis"]] + [""]
    path.write_text("\n".join(L))


def analysis(res: dict) -> list[str]:
    """Plain sentences from the profile numbers; no claim that the numbers do not carry."""
    out = []
    mm = res["matmul"]
    for prof in res.get("profiles", []):
        p = prof["precision"]
        cats = {c["category"]: c for c in prof["by_category"]}
        dw = cats.get("conv depthwise")
        if dw:
            out.append(f"{p}: depthwise convolutions take {dw['pct_time']:.0f} % of the time for "
                       f"{dw['pct_flops']:.0f} % of the FLOPs, at {_fmt(dw['achieved_gflops'])} GFLOP/s against "
                       f"{mm[p]['gflops']:,.0f} for a large matmul: they do k×k multiply-adds per value read, "
                       "too few to keep the multiply units busy, which usually leaves them memory-bound.")
        pw = cats.get("conv pointwise 1x1")
        if pw:
            out.append(f"{p}: pointwise (1×1) convolutions, {pw['pct_flops']:.0f} % of the FLOPs, take "
                       f"{pw['pct_time']:.0f} % of the time at {_fmt(pw['achieved_gflops'])} GFLOP/s "
                       f"({100 * (pw['achieved_gflops'] or 0) / mm[p]['gflops']:.0f} % of the matmul rate).")
        fast = [c["category"] for c in prof["by_category"] if (c["achieved_gflops"] or 0) > mm[p]["gflops"]]
        if fast:
            out.append(f"{p}: {', '.join(fast)} ran faster than the matmul measurement, which therefore "
                       f"underestimates this CPU's peak ({mm[p]['n']}×{mm[p]['n']} is too small, or oneDNN's "
                       "convolutions beat torch.matmul): the limit is too low and fraction_of_limit too high.")
        mem = [c for c in prof["by_category"] if c["category"] in (
            "batch norm", "activation (ReLU6)", "padding (TF 'same')", "residual add",
            "dtype casts (uint8 input, bf16 autocast)", "input normalisation / layout copies", "pooling / concat")]
        if mem:
            share = sum(c["pct_time"] for c in mem)
            names = ", ".join(f"{c['category']} {c['pct_time']:.0f} %" for c in mem if c["pct_time"] >= 1)
            out.append(f"{p}: operators that do no counted FLOPs (memory-bound: {names or 'each under 1 %'}) take "
                       f"{share:.0f} % of the time in all; the limit counts them as free. Eval-mode batch norm is "
                       "not folded into the convolutions, and the TF-'same' padding of this backbone copies every "
                       "strided layer's input.")
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    others = OtherLoad()
    quick = args.quick
    model, info = build_model(args.ckpt)
    size = args.image_size or (64 if quick else info["trained_image_size"])
    bf16 = native_bf16()
    precisions = args.precisions.split(",") if args.precisions else (["fp32", "bf16"] if bf16 else ["fp32"])
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise SystemExit(f"--precisions: unknown {p!r}; use fp32 and/or bf16")
    headline = "bf16" if "bf16" in precisions and bf16 else precisions[0]
    plan = {  # (warm-up forwards, repetitions, forwards per repetition)
        "batch1": (1, 3, 2) if quick else (20, 30, 10),
        "batch64": (1, 2, 1) if quick else (3, 15, 1),
    }
    mm_n, mm_reps = (512, 3) if quick else (4096, 5)

    from leukonet.provenance import machine

    flops = count_flops(model, size)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    mm = {p: matmul_gflops(dtypes[p], mm_n, mm_reps) for p in precisions}
    memory = copy_gbps(64 if quick else 512, 3 if quick else 10)
    per_precision = {}
    for p in precisions:
        d = {}
        for key, batch in (("batch1", 1), ("batch64", 64)):
            w, r, i = plan[key]
            d[key] = time_forward(model, p, batch, size, w, r, i)
        limit = mm[p]["gflops"] / flops["gflops_per_image"]
        d["limit_images_per_s"] = limit
        d["fraction_of_limit_batch1"] = d["batch1"]["images_per_s"]["median"] / limit
        d["fraction_of_limit_batch64"] = d["batch64"]["images_per_s"]["median"] / limit
        per_precision[p] = d
    if not args.no_compile:  # the same model with its backbone compiled, as `evaluate compile=true` runs it
        for p in precisions:
            compiled = copy.deepcopy(model)
            compiled.backbone.compile()
            t0 = time.perf_counter()
            with torch.inference_mode(), precision_ctx(p):
                compiled(images(64, size))  # compiles
            d = {"compile_s": round(time.perf_counter() - t0, 1)}
            for key, batch in (("batch1", 1), ("batch64", 64)):
                w, r, i = plan[key]
                d[key] = time_forward(compiled, p, batch, size, w + 1, r, i)  # batch 1 compiles once more
            d["limit_images_per_s"] = per_precision[p]["limit_images_per_s"]
            d["fraction_of_limit_batch1"] = d["batch1"]["images_per_s"]["median"] / d["limit_images_per_s"]
            d["fraction_of_limit_batch64"] = d["batch64"]["images_per_s"]["median"] / d["limit_images_per_s"]
            per_precision[f"{p}+compile"] = d
    if not args.no_onnx and onnx_available():  # fp32 only: ONNX Runtime's CPU kernels run the fp32 graph
        d = time_onnx(model, size, plan, torch.get_num_threads())
        fp32_limit = mm["fp32"]["gflops"] / flops["gflops_per_image"] if "fp32" in mm else None
        if fp32_limit is None:  # --precisions bf16 only: measure the fp32 matmul rate for this row's limit
            mm["fp32"] = matmul_gflops(torch.float32, mm_n, mm_reps)
            fp32_limit = mm["fp32"]["gflops"] / flops["gflops_per_image"]
        d["limit_images_per_s"] = fp32_limit
        d["fraction_of_limit_batch1"] = d["batch1"]["images_per_s"]["median"] / fp32_limit
        d["fraction_of_limit_batch64"] = d["batch64"]["images_per_s"]["median"] / fp32_limit
        per_precision["fp32+onnxruntime"] = d
    head = per_precision[headline]
    res = {
        "quick": quick,
        "images_per_s_batch1": head["batch1"]["images_per_s"]["median"],
        "images_per_s_batch64": head["batch64"]["images_per_s"]["median"],
        "fraction_of_limit": head["fraction_of_limit_batch64"],
        "fraction_of_limit_batch1": head["fraction_of_limit_batch1"],
        # the best row, which may need torch.compile (evaluate's compile=true)
        "best": max(({"variant": k, "images_per_s_batch64": d["batch64"]["images_per_s"]["median"],
                      "fraction_of_limit": d["fraction_of_limit_batch64"]} for k, d in per_precision.items()),
                    key=lambda b: b["images_per_s_batch64"]),
        "headline_precision": headline,
        "gflops_per_image": flops["gflops_per_image"],
        "matmul_gflops": mm[headline]["gflops"],
        "target_fraction": TARGET_FRACTION,
        "image_size": size,
        "precisions": per_precision,
        "matmul": mm,
        "memory": memory,
        "flops": flops,
        "model": info,
        "native_bf16": bf16,
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "command": shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *argv]),
        "notes": [
            "fraction_of_limit is batch 64 at the headline precision (bf16 autocast where the CPU has native "
            "bf16, as leukonet trains and evaluates; else fp32) against the matmul rate of that precision.",
            "bf16 autocast is entered once per forward (as Lightning's precision plugin does), so weight casts "
            "are part of every forward.",
        ],
    }
    if not args.no_profile and any(per_precision[p]["fraction_of_limit_batch64"] < TARGET_FRACTION for p in precisions):
        res["profiles"] = [profile_forward(model, p, 64, size, flops, warmup=1 if quick else 2, reps=1 if quick else 3)
                           for p in precisions]
        res["analysis"] = analysis(res)
    res["loadavg_before"] = load_before
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["other_processes_cpu_pct"] = others.pct()
    res["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, out / "results.md")
    print(f"{headline}: {res['images_per_s_batch1']:.1f} images/s at batch 1, {res['images_per_s_batch64']:.1f} at "
          f"batch 64; limit {head['limit_images_per_s']:.1f} images/s, fraction_of_limit {res['fraction_of_limit']:.3f}; "
          f"results in {out}/results.{{json,md}} ({res['wall_s']} s)")
    return res


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # leukonet from this checkout, also without an editable install
    main()
