#!/usr/bin/env bash
# The report's two-phase recipe on the 2,500 real PBC cells, with the ImageNet weights that exist
# offline (EfficientNet-Lite0), then the same model on the external BCCD cells.
# Writes this folder's report.md, metrics.json, figures and bccd/; checkpoints stay in outputs/.
#   bash experiments/two_phase/run.sh            (data from $LEUKONET_DATA or ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${LEUKONET_DATA:-../shared/data}
RUN=outputs/two_phase_lite0/$(date +%Y-%m-%d_%H-%M-%S)
HERE=experiments/two_phase
make install
.venv/bin/python -m leukonet.train +experiment=two_phase_lite0 "data.root=$DATA/pbc-2500" "hydra.run.dir=$RUN"
.venv/bin/python -m leukonet.evaluate "ckpt_path=$RUN/checkpoints/last.ckpt" "data.root=$DATA/bccd-crops" "hydra.run.dir=$RUN/bccd"
for dir in "$RUN" "$RUN/bccd"; do
  dest=$HERE${dir#"$RUN"}
  mkdir -p "$dest"
  cp "$dir"/report.md "$dir"/metrics.json "$dir"/predictions.csv "$dir"/*.png "$dest"/
done
cp "$RUN/split.csv" "$RUN/data_summary.json" "$RUN/csv/metrics.csv" "$HERE"/ && mv "$HERE/metrics.csv" "$HERE/history.csv"
echo "results in $HERE (run directory: $RUN)"
