#!/usr/bin/env bash
# Toy LLaVA-1.5 component ablation on CPU (see README.md): linear vs MLP connector x two image
# resolutions x 5 seeds on tiny random-init models and the synthetic scenes, stage 1 from the
# frozen encoder's feature cache (stage 2 reads pixels: its evaluation generates from images);
# then `vlmlab report` writes results/report.md (mean, 95 % interval, paired comparisons by
# seed, per-seed numbers) + report.png + report.json. About 83 min on 2 cores (README.md).
#
#   experiments/llava15_ablations/run_toy.sh            # from anywhere; PYTHON=... to pick one
#
# Everything goes to a dedicated store (default runs/llava15_toy, gitignored): rerunning adds a
# new sweep; the report covers the newest sweep only (its MLflow parent run).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/llava15_ablations
PY=${PYTHON:-python}
# tiny matrices gain nothing from 2 threads, and on a shared machine 2 threads per process
# oversubscribe the cores (measured: a 3x slower step); set OMP_NUM_THREADS to override
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export VLMLAB_ROOT=${TOY_ROOT:-runs/llava15_toy}
SWEEP_DIR="$VLMLAB_ROOT/sweeps/$(date +%Y%m%d-%H%M%S)"
start=$(date +%s)

# 1. the shared language warm-up of the random tiny LLM (once; every job starts from it)
$PY train.py experiment=toy_ablation stage=lm trainer.enable_progress_bar=false

# 2. per arm and seed: stage 1 (connector alignment), then stage 2 (connector + LLM, then
#    held-out QA) from that arm's own stage-1 checkpoint; one MLflow parent run per sweep
#    (joblib: JOBS jobs at a time, default 2 = one per core of a 2-core machine)
ARMS=(connector=linear,mlp encoder.config.image_size=64,96 "seed=${SEEDS:-1,2,3,4,5}")
LAUNCH=(hydra/launcher=joblib "hydra.launcher.n_jobs=${JOBS:-2}" trainer.enable_progress_bar=false)
$PY train.py -m experiment=toy_ablation stage=1 "${ARMS[@]}" "${LAUNCH[@]}" \
  "hydra.sweep.dir=$SWEEP_DIR-stage1"
$PY train.py -m experiment=toy_ablation stage=2 "${ARMS[@]}" "${LAUNCH[@]}" \
  "hydra.sweep.dir=$SWEEP_DIR"

# 3. the report of that sweep (also logged as artifacts of the parent run): every scenes
#    benchmark, paired by seed
METRICS=eval/scenes_colour/accuracy,eval/scenes_shape/accuracy,eval/scenes_count/accuracy
METRICS+=,eval/scenes_position/accuracy,eval/scenes_relation/accuracy,eval/scenes_mc/accuracy
METRICS+=,eval/scenes_pope_adversarial/f1,eval/accuracy
parent=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['run_id'])" "$SWEEP_DIR/mlflow_parent.json")
$PY -m vlmlab report --experiment llava15_toy --parent "$parent" \
  --group-by connector,encoder.config.image_size \
  --metrics "$METRICS" \
  --out "$HERE/results" --tracking-uri "sqlite:///$(cd "$VLMLAB_ROOT" && pwd)/mlflow.db"
echo "toy ablation: wall time $(( $(date +%s) - start ))s; mlflow ui --backend-store-uri sqlite:///$VLMLAB_ROOT/mlflow.db"
