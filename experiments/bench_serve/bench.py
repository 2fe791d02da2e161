"""The review station under load, and killed mid-upload.

    .venv/bin/python experiments/bench_serve/bench.py [--ckpt RUN/checkpoints/last.ckpt] [--cells DIR] [--out DIR]

1. Load: ``python -m leukonet.serve`` in a subprocess (a free port, a fresh station directory); ``--clients``
   threads, each with its own case, all start at once and upload their ``--per-client`` cells in requests of
   ``--per-request`` files. Every request's latency is recorded; afterwards every cell must be in the database
   (``cells_stored`` == ``cells_sent``) and every case must hold exactly its client's cells.
2. kill -9: the same load on the same station, and the server is killed with SIGKILL once ``--kill-after`` requests
   have been answered. Restarted on the same database, it must come up, and the database must be intact:
   ``PRAGMA integrity_check`` ok, no foreign-key violation, no upload without cells or cell without upload, every
   case's cells a whole number of requests (a request is committed whole or not at all), every acknowledged
   request's cells present, every stored image whole (its bytes hash to its name); then it takes a new upload.

Without ``--ckpt`` a tiny model is trained first (the tests' timm test backbone at 32 px, about half a minute);
cells: the first ``clients x per-client`` of ``--cells`` (default the PBC crops in ../shared/data/pbc-2500 when
present, else synthetic ones), uploaded with ``fields=false`` so that one file is one cell. Writes
``results.json`` and ``results.md`` into ``--out`` (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from leukonet.provenance import portable_text  # noqa: E402
TINY = ["model.backbone=test_efficientnet", "model.pretrained=false", "data.image_size=32", "data.batch_size=16",
        "data.num_workers=0", "callbacks.two_phase.phase1.max_epochs=2", "callbacks.two_phase.phase2.max_epochs=2",
        "~callbacks.progress_bar", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a leukonet checkpoint; default: a tiny model trained here")
    p.add_argument("--cells", help="a folder of cell images (searched recursively); default: PBC, else synthetic")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--per-client", type=int, default=50)
    p.add_argument("--per-request", type=int, default=5)
    p.add_argument("--kill-after", type=int, default=40, help="answered requests before the kill -9")
    p.add_argument("--out", default=str(HERE))
    return p.parse_args(argv)


def tiny_checkpoint(work: Path) -> Path:
    cmd = [sys.executable, "-m", "leukonet.train", "+experiment=demo", f"hydra.run.dir={work / 'run'}",
           f"paths.data_dir={work / 'data'}", "data.synthetic_cfg.n_per_class=20", "data.synthetic_cfg.size=48", *TINY]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return work / "run" / "checkpoints" / "last.ckpt"


def cell_files(cells: str | None, n: int, work: Path) -> tuple[list[Path], list[Path], str]:
    """Cells for the load round and, different ones where the folder has enough, for the kill -9 round (so that
    its images are new to the store)."""
    pbc = REPO.parent / "shared" / "data" / "pbc-2500"
    if cells is None and pbc.is_dir():
        cells = str(pbc)
    if cells is None:
        from leukonet.data.synthetic import generate_dataset

        cells = str(generate_dataset(work / "synthetic", n_per_class=-(-2 * n // 5), size=128, seed=0))
    files = sorted(p for p in Path(cells).rglob("*")
                   if p.suffix.lower() in {".jpg", ".jpeg", ".png"} and not p.name.startswith("."))  # no ._ / .DS_ files
    if len(files) < n:
        raise SystemExit(f"{cells}: {len(files)} images, need {n}")
    if len(files) < 2 * n:
        return files[:n], files[:n], cells
    spread = files[::len(files) // (2 * n)][:2 * n]  # over the classes
    return spread[0::2], spread[1::2], cells


class Server:
    def __init__(self, ckpt: Path, station: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "leukonet.serve", f"ckpt_path={ckpt}", "port=0", f"station_dir={station}",
             "fields=false"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        t0 = time.perf_counter()
        for line in self.proc.stdout:
            if "serving" in line:
                self.url = line.split(" on ")[1].split()[0].rstrip("/")
                break
        else:
            raise SystemExit(f"the server did not start (exit {self.proc.wait()})")
        self.start_s = time.perf_counter() - t0
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def run_clients(url: str, files: list[Path], clients: int, per_client: int, per_request: int,
                on_answer=None) -> dict:
    """Every client creates its case and uploads its cells; returns latencies and what was acknowledged."""
    barrier = threading.Barrier(clients)
    latencies, acked, failures, cases = [], {}, [], {}
    lock = threading.Lock()

    def client(i: int) -> None:
        mine = files[i * per_client:(i + 1) * per_client]
        with httpx.Client(base_url=url, trust_env=False, timeout=600) as http:
            try:
                case = http.post("/api/cases", json={"note": f"bench client {i}"}).json()["id"]
            except httpx.HTTPError as err:
                failures.append(f"client {i}: {type(err).__name__}")
                return
            with lock:
                cases[i] = case
            barrier.wait()
            for j in range(0, len(mine), per_request):
                batch = mine[j:j + per_request]
                t0 = time.perf_counter()
                try:
                    res = http.post(f"/api/cases/{case}/files",
                                    files=[("files", (p.name, p.read_bytes())) for p in batch])
                    res.raise_for_status()
                except httpx.HTTPError as err:
                    with lock:
                        failures.append(f"client {i} request {j // per_request}: {type(err).__name__}")
                    return
                stored = sum(len(r.get("cells", [])) for r in res.json()["results"] if "duplicate_of" not in r)
                with lock:
                    latencies.append(1000 * (time.perf_counter() - t0))
                    acked[case] = acked.get(case, 0) + stored
                    answered = len(latencies)
                if on_answer:
                    on_answer(answered)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": time.perf_counter() - t0, "latencies": latencies, "acked": acked, "failures": failures,
            "cases": cases}


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def integrity(station: Path, per_request: int, acked: dict[int, int]) -> dict:
    sys.path.insert(0, str(REPO))
    from leukonet.station.storage import ImageStore

    db = sqlite3.connect(station / "station.db")
    one = lambda q: db.execute(q).fetchall()  # noqa: E731
    cells_per_case = dict(one("SELECT case_id, count(*) FROM cells GROUP BY case_id"))
    store = ImageStore(station / "images")
    images = one("SELECT sha256, suffix FROM images")
    out = {"integrity_check": one("PRAGMA integrity_check")[0][0],
           "foreign_key_violations": len(one("PRAGMA foreign_key_check")),
           "uploads_without_cells": one("SELECT count(*) FROM uploads u WHERE u.image_sha IS NOT NULL AND NOT EXISTS "
                                        "(SELECT 1 FROM cells c WHERE c.upload_id = u.id)")[0][0],
           "cells_without_upload": one("SELECT count(*) FROM cells c LEFT JOIN uploads u ON u.id = c.upload_id "
                                       "WHERE u.id IS NULL")[0][0],
           "half_written_cases": sum(n % per_request != 0 for n in cells_per_case.values()),
           "acknowledged_cells": sum(acked.values()),
           "acknowledged_cells_missing": sum(max(0, n - cells_per_case.get(c, 0)) for c, n in acked.items()),
           "cells_committed_unacknowledged": sum(cells_per_case.get(c, 0) - n for c, n in acked.items()),
           "images": len(images), "images_damaged": sum(not store.verify(s, x) for s, x in images),
           "temporary_files_left": sum(1 for p in (station / "images").rglob(".incoming-*"))}
    db.close()
    out["intact"] = (out["integrity_check"] == "ok" and not out["foreign_key_violations"]
                     and not out["uploads_without_cells"] and not out["cells_without_upload"]
                     and not out["half_written_cases"] and not out["acknowledged_cells_missing"]
                     and not out["images_damaged"])
    return out


def machine() -> dict:
    import torch

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "torch": torch.__version__,
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n = args.clients * args.per_client
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(work)
        files, other_files, source = cell_files(args.cells, n, work)
        station = work / "station"

        server = Server(ckpt, station)
        load = run_clients(server.url, files, args.clients, args.per_client, args.per_request)
        with httpx.Client(base_url=server.url, trust_env=False) as http:
            listed = {c["id"]: c["cells"] for c in http.get("/api/cases").json()}
        stop_status = server.stop()
        stored = sum(listed.values())
        lat = load["latencies"]

        server = Server(ckpt, station)  # the kill -9 round, on the same station
        killed = threading.Event()

        def kill(answered: int) -> None:
            if answered >= args.kill_after and not killed.is_set():
                killed.set()
                os.kill(server.proc.pid, signal.SIGKILL)

        crash = run_clients(server.url, other_files, args.clients, args.per_client, args.per_request, on_answer=kill)
        server.proc.wait()
        restarted = Server(ckpt, station)
        with httpx.Client(base_url=restarted.url, trust_env=False, timeout=120) as http:
            case = http.post("/api/cases", json={"note": "after the crash"}).json()["id"]
            after = http.post(f"/api/cases/{case}/files",  # a whole request's worth: its case is not half-written
                              files=[("files", (p.name, p.read_bytes())) for p in files[:args.per_request]])
        restarted.stop()
        check = integrity(station, args.per_request, crash["acked"])

    results = {
        "command": shlex.join([".venv/bin/python", "experiments/bench_serve/bench.py",
                               *(argv if argv is not None else sys.argv[1:])]),
        "model": str(args.ckpt) if args.ckpt else "tiny: timm test_efficientnet, 32 px, trained on synthetic cells",
        "cells_from": portable_text(source, REPO), "fields": "false (one file, one cell)", "explain": True,
        "clients": args.clients, "cells_per_client": args.per_client, "files_per_request": args.per_request,
        "cells_sent": n, "cells_stored": stored, "cases_complete": sum(v == args.per_client for v in listed.values()),
        "requests": len(lat), "failed_requests": load["failures"],
        "p50_ms": round(pct(lat, 50), 1), "p95_ms": round(pct(lat, 95), 1), "max_ms": round(max(lat), 1),
        "wall_s": round(load["wall_s"], 2), "cells_per_s": round(stored / load["wall_s"], 1),
        "server_start_s": round(server.start_s, 2), "sigterm_exit_status": stop_status,
        "kill9": {"killed_after_answers": args.kill_after, "requests_answered_before_kill": len(crash["latencies"]),
                  "requests_failed_by_kill": len(crash["failures"]),
                  "restart_s": round(restarted.start_s, 2), "upload_after_restart_status": after.status_code, **check},
        "machine": machine(),
        # other work on the machine (the 1-minute load average): this run competed with it for the CPUs
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    k = results["kill9"]
    (out / "results.md").write_text(f"""# Review station under load (`{results['command']}`)

{results['clients']} clients at once, each its own case, {results['cells_per_client']} cells each in requests of
{results['files_per_request']} files ({results['cells_from']}; model: {results['model']}; Grad-CAM on;
{results['machine']['cpu']}, {results['machine']['cpus']} CPUs, AVX512-BF16 {results['machine']['avx512_bf16']}, torch
{results['machine']['torch']}; 1-minute load average {results['load_average_1min']['before']} before the run (above
about 1, other work shared the CPUs), {results['load_average_1min']['after']} after).

| cells sent | cells stored | cases complete | p50 | p95 | max | cells/s |
|---:|---:|---:|---:|---:|---:|---:|
| {n} | {stored} | {results['cases_complete']} / {args.clients} | {results['p50_ms']} ms | {results['p95_ms']} ms | {results['max_ms']} ms | {results['cells_per_s']} |

Failed requests: {len(load['failures'])}. Server start {results['server_start_s']} s; SIGTERM exit status {stop_status}.

## kill -9 during uploads

The same load on the same station; SIGKILL after {k['requests_answered_before_kill']} answered requests
({k['requests_failed_by_kill']} clients lost their connection). Restarted in {k['restart_s']} s, then took a new
upload (HTTP {k['upload_after_restart_status']}).

| check | result |
|---|---|
| `PRAGMA integrity_check` | {k['integrity_check']} |
| foreign-key violations | {k['foreign_key_violations']} |
| uploads without cells / cells without upload | {k['uploads_without_cells']} / {k['cells_without_upload']} |
| cases with part of a request (half-written) | {k['half_written_cases']} |
| acknowledged cells | {k['acknowledged_cells']}, missing {k['acknowledged_cells_missing']} |
| committed but not acknowledged (killed before the answer) | {k['cells_committed_unacknowledged']} |
| stored images, damaged | {k['images']}, {k['images_damaged']} |
| temporary files left in the store (never referenced) | {k['temporary_files_left']} |
| **database intact** | **{k['intact']}** |
""")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
