#!/usr/bin/env bash
# leukonet against the report's fastai recipe on one machine: same split, augmentation, backbone and
# weights (issue 3). Full size: about 2 h 10 min on 2 cores (measured: fastai 94 min, leukonet 36 min); run it on an otherwise idle machine.
#   bash experiments/bench_fastai/run.sh                 (data: ${LEUKONET_DATA:-../shared/data}/pbc-2500)
#   bash experiments/bench_fastai/run.sh --quick --out /tmp/bench_fastai   (smoke test, a minute or two)
# Writes results.json and results.md into this folder (or --out DIR); run directories, checkpoints
# and logs go to outputs/bench_fastai/<date>_<time>/ (or --work DIR).
#
# fastai is not a leukonet dependency. It is installed here, into .venv only if pip's dry run shows
# that no installed package would change version; otherwise into .venv-fastai, a venv that sees
# .venv's packages (a .pth file) and holds only what fastai needs on top, and the fastai half runs
# there (results.json then says whether the core versions differ).
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x .venv/bin/python ] || make install
SPEC='fastai>=2.8,<2.9'
PY=.venv/bin/python
FASTAI_PY=$PY
if [ -x .venv-fastai/bin/python ] && .venv-fastai/bin/python -c "import fastai" 2>/dev/null; then
  FASTAI_PY=.venv-fastai/bin/python
elif ! $PY -c "import fastai" 2>/dev/null; then
  report=$(mktemp)
  $PY -m pip install --quiet --dry-run --report "$report" "$SPEC"
  changes=$($PY - "$report" <<'PYEOF'
import json, sys
from importlib.metadata import PackageNotFoundError, version
for item in json.load(open(sys.argv[1]))["install"]:
    name, new = item["metadata"]["name"], item["metadata"]["version"]
    try:
        old = version(name)
    except PackageNotFoundError:
        continue
    if old != new:
        print(f"{name} {old} -> {new}")
PYEOF
)
  rm -f "$report"
  if [ -z "$changes" ]; then
    echo "[run.sh] installing $SPEC into .venv (pip's dry run: no installed package changes)"
    $PY -m pip install --quiet "$SPEC"
  else
    echo "[run.sh] installing $SPEC into .venv would change:"
    echo "$changes" | sed 's/^/    /'
    echo "[run.sh] so it goes into .venv-fastai instead, on top of .venv's packages"
    $PY -m venv .venv-fastai
    site=$(.venv-fastai/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    $PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$site/leukonet-venv.pth"
    .venv-fastai/bin/python -m pip install --quiet "$SPEC"
    FASTAI_PY=.venv-fastai/bin/python
  fi
fi
exec $PY experiments/bench_fastai/bench.py "$@" --fastai-python "$FASTAI_PY"
