#!/usr/bin/env bash
# Toy AnyRes study on CPU (see README.md): encoder.image=pad vs anyres x 3 seeds on the
# resolution task (data=scenes_hires, eval=scenes_hires) with tiny random-init parts, then
# report.py writes results/report.md (+ report.json) next to this script from the MLflow store.
#
#   experiments/anyres_study/run_toy.sh              # from anywhere; PYTHON=... SEEDS=1,2,3,4,5
#
# Everything goes to a dedicated store (default runs/anyres_study, gitignored): rerunning adds a
# new sweep; the report covers the newest sweep only (its MLflow parent run).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/anyres_study
PY=${PYTHON:-python}
# one thread per process: tiny matrices gain nothing from more, and a shared machine oversubscribes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VLMLAB_ROOT=${TOY_ROOT:-runs/anyres_study}
SWEEP_DIR="$VLMLAB_ROOT/sweeps/$(date +%Y%m%d-%H%M%S)"
start=$(date +%s)

# one job per arm and seed (the scenes are generated once, by the first job); same seed = same
# data order and initial weights in both arms, so the arms pair by seed
$PY train.py -m experiment=anyres_study encoder.image=pad,anyres "seed=${SEEDS:-1,2,3}" \
  trainer.enable_progress_bar=false "hydra.sweep.dir=$SWEEP_DIR"

parent=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['run_id'])" "$SWEEP_DIR/mlflow_parent.json")
URI="sqlite:///$(cd "$VLMLAB_ROOT" && pwd)/mlflow.db"
# mean ± std per arm and a plot (report.md/.png), then the per-seed and paired table (study.md)
$PY -m vlmlab report --experiment anyres_study --parent "$parent" --group-by encoder.image \
  --metrics eval/scenes_hires_small/accuracy,eval/scenes_hires_large/accuracy,eval/scenes_hires_count/accuracy \
  --out "$HERE/results" --tracking-uri "$URI"
$PY "$HERE/report.py" --parent "$parent" --out "$HERE/results" --tracking-uri "$URI"
echo "anyres study: wall time $(( $(date +%s) - start ))s"
