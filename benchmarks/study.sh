#!/usr/bin/env bash
# The loss study on the real scans, on one GPU, end to end, timed:
#
#   benchmarks/study.sh SCANS_DIR OUT_DIR [extra train.py overrides ...]
#
# SCANS_DIR holds images/ + masks/ (e.g. the 36 PROMISE12 volumes); OUT_DIR receives the
# prepared data (reused when present), one sweep per seed (OUT_DIR/study/seedK: 8 losses x 5
# folds), the report over every seed that finished (OUT_DIR/study/report/), the GPU's
# utilisation (gpu_util.csv), the timings and the software versions (study_run.json).
# Seeds run one after another, each a complete block of fold x loss pairs, so a study cut short
# still compares paired runs. Environment:
#   STUDY_SEEDS="0 1 2"      the seeds, in order
#   STUDY_BUDGET_S=0         if > 0: a seed starts only if it should end within this many
#                            seconds of the start, judged by the longest seed so far (the
#                            first seed always starts; a limit from outside can still cut it)
#   STUDY_IMAGE_SIZE=256     the prepared slice size
# The settings below are docs/STUDY.md's; extra arguments override them. Use a fresh OUT_DIR
# for other settings: the report pools every run under OUT_DIR/study. Exits 1 if a seed's
# sweep or the report failed.
set -euo pipefail
scans=${1:?usage: benchmarks/study.sh SCANS_DIR OUT_DIR [overrides ...]}
out=${2:?usage: benchmarks/study.sh SCANS_DIR OUT_DIR [overrides ...]}
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
size=${STUDY_IMAGE_SIZE:-256}
seeds=${STUDY_SEEDS:-0 1 2}
budget=${STUDY_BUDGET_S:-0}
if ! [[ $budget =~ ^[0-9]+$ ]]; then
  echo "study.sh: STUDY_BUDGET_S=$budget: not a whole number of seconds" >&2
  exit 2
fi
mkdir -p "$out/study"
data="$out/prepared_$size"
now() { date +%s; }
hydra_quoted() { local s=${1//\'/\\\'}; printf "'%s'" "$s"; }  # a path may hold = , ' [ ]

started=$(now)
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits \
    -lms 1000 > "$out/gpu_util.csv" 2> /dev/null &
  sampler=$!
  trap 'kill $sampler 2> /dev/null || true' EXIT
fi
if [ ! -f "$data/manifest.csv" ]; then
  "$python" -m prostate_seg prepare input_dir="$scans" output_dir="$data" image_size="$size"
fi
prepared=$(now)

# The recipe that generalises to unseen patients (docs/RESULTS.md: instance norm, intensity and
# scale augmentation, 2.5D input, the last epoch kept) on a U-Net of half the width, Adam 1e-3
# with cosine decay, 8 jobs sharing the GPU with the decoded slices in memory, compiled
# (benchmarks/real_data_accuracy.py --setting gpu trains the same; uncompiled,
# instance norm costs 1.7x the GPU time of a batch-norm step; docs/STUDY.md has the
# measurements behind each setting).
timings=()
failed=()
last=0
for seed in $seeds; do
  elapsed=$(( $(now) - started ))
  if [ "$budget" -gt 0 ] && [ $(( elapsed + last * 11 / 10 )) -gt "$budget" ]; then
    echo "study.sh: seed $seed not started: ${elapsed} s used, the longest seed took ${last} s," \
         "the budget is ${budget} s"
    continue
  fi
  begun=$(now)
  "$python" "$here/train.py" -m experiment=paper data.dir="$(hydra_quoted "$data")" \
    data.image_size="$size" hydra.sweep.dir="$(hydra_quoted "$out/study/seed$seed")" \
    "study.seeds=[$seed]" hydra/launcher=gpu_pool hydra.launcher.jobs_per_gpu=8 \
    model=unet model.net.features='[32,64,128,256]' model.net.norm=instance augment=default \
    model.compile=true optimizer.lr=1e-3 scheduler=cosine trainer.max_epochs=40 \
    callbacks=final data.cache=true data.context_slices=1 \
    "$@" || { failed+=("seed $seed"); continue; }
  took=$(( $(now) - begun ))
  timings+=("$seed:$took")
  last=$(( took > last ? took : last ))
done
finished=$(now)
if [ -n "${sampler-}" ]; then  # stopped before its file is read
  kill "$sampler" 2> /dev/null || true
  wait "$sampler" 2> /dev/null || true
fi
rm -rf "$out/study/report"
"$python" -m prostate_seg report "$out/study" || failed+=("the report")

"$python" - "$out" "$started" "$prepared" "$finished" "${timings[*]-}" \
  "$(IFS=';'; echo "${failed[*]-}")" "$*" <<'PY'
import json, platform, sys
import torch, pytorch_lightning as pl
out, started, prepared, finished, timings, failed, extra = sys.argv[1:]
util = []
try:
    lines = open(f"{out}/gpu_util.csv").readlines()
except OSError:
    lines = []
for line in lines:
    try:
        util.append(float(line.split(",")[1]))
    except (ValueError, IndexError):
        pass  # a partial last line, or [N/A]
record = {
    "prepare_s": int(prepared) - int(started),
    "study_wall_s": int(finished) - int(prepared),
    "seed_wall_s": {s.split(":")[0]: int(s.split(":")[1]) for s in timings.split()},
    "failed": failed.split(";") if failed else [],
    "gpu_util_mean": sum(util) / len(util) if util else None,
    "extra_overrides": extra,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__, "pytorch_lightning": pl.__version__,
    "python": platform.python_version(), "host": platform.node(),
}
with open(f"{out}/study_run.json", "w") as f:
    json.dump(record, f, indent=2)
print(json.dumps(record, indent=2))
PY
if [ ${#failed[@]} -gt 0 ]; then
  echo "study.sh: failed: $(IFS=','; echo "${failed[*]}") (named above, with their logs)" >&2
  exit 1
fi
