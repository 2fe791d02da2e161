#!/usr/bin/env bash
# CPU inference throughput against the machine's matmul limit (issue 3). Run it on an idle machine:
# other work on the cores makes every number too low (results.md says how busy the machine was).
#   bash experiments/bench_inference/run.sh [--ckpt RUN/checkpoints/last.ckpt] [--quick] [--out DIR]
# Without --ckpt: the two_phase_lite0 config's model with the packaged ImageNet weights.
# Writes results.json and results.md into this folder (or --out DIR).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || make install
exec .venv/bin/python experiments/bench_inference/bench.py "$@"
