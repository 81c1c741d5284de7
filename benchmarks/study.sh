#!/usr/bin/env bash
# The loss study on the real scans, on one GPU, end to end, timed:
#
#   benchmarks/study.sh SCANS_DIR OUT_DIR [extra train.py overrides ...]
#
# SCANS_DIR holds images/ + masks/ (e.g. the 36 PROMISE12 volumes); OUT_DIR receives the
# prepared data (reused when present), the sweep (every job folder and report/), the timings
# and the software versions (study_run.json). The settings below are the study's as written in
# docs/STUDY.md; extra arguments override them (e.g. hydra.launcher.jobs_per_gpu=8).
set -euo pipefail
scans=${1:?usage: benchmarks/study.sh SCANS_DIR OUT_DIR [overrides ...]}
out=${2:?usage: benchmarks/study.sh SCANS_DIR OUT_DIR [overrides ...]}
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
size=${STUDY_IMAGE_SIZE:-256}
mkdir -p "$out"
data="$out/prepared_$size"

started=$(date +%s.%N)
if [ ! -f "$data/manifest.csv" ]; then
  "$python" -m prostate_seg prepare input_dir="$scans" output_dir="$data" image_size="$size"
fi
prepared=$(date +%s.%N)

# The whole study: 8 losses x 5 folds x 3 seeds (study.seeds), jobs sharing the GPU.
"$python" "$here/train.py" -m experiment=paper data.dir="$data" data.image_size="$size" \
  hydra/launcher=gpu_pool hydra.launcher.jobs_per_gpu=4 \
  model=unet model.net.features='[32,64,128,256]' model.compile=false \
  optimizer.lr=1e-3 scheduler=cosine trainer.max_epochs=40 \
  callbacks.early_stopping.patience=10 data.cache=true \
  hydra.sweep.dir="$out/study" "$@"
finished=$(date +%s.%N)

"$python" - "$out" "$started" "$prepared" "$finished" "$*" <<'PY'
import json, platform, sys
import torch, pytorch_lightning as pl
out, started, prepared, finished, extra = sys.argv[1:]
record = {
    "prepare_s": float(prepared) - float(started),
    "study_wall_s": float(finished) - float(prepared),
    "extra_overrides": extra,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "pytorch_lightning": pl.__version__,
    "python": platform.python_version(), "host": platform.node(),
}
with open(f"{out}/study_run.json", "w") as f:
    json.dump(record, f, indent=2)
print(json.dumps(record, indent=2))
PY
