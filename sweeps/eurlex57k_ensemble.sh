#!/usr/bin/env bash
# EURLEX57K's ensemble (docs/baselines.md): the preset's linear model at three widths and its MLP, each one run of
# train.py (15 minutes at most), then scored together by eval.py. Extra arguments go to every train.py run.
#   XMC_DATA_DIR=<data root> bash sweeps/eurlex57k_ensemble.sh [hardware.num_threads=1 ...]
set -euo pipefail
out=${ENSEMBLE_DIR:-outputs/eurlex57k_ensemble}
for dim in 512 1024 2048; do
  python train.py +experiment=eurlex57k encoder.dim=$dim hydra.run.dir=$out/linear$dim "$@"
done
python train.py +experiment=eurlex57k encoder=bow_mlp hydra.run.dir=$out/mlp "$@"
python eval.py "ckpt_path=[$out/linear512/checkpoints/best.ckpt,$out/linear1024/checkpoints/best.ckpt,$out/linear2048/checkpoints/best.ckpt,$out/mlp/checkpoints/best.ckpt]" \
  hydra.run.dir=$out/ensemble
