#!/usr/bin/env bash
# The GPU figures of issue 17 in one call, for a lent accelerator with no internet
# (EXPERIMENTS.md, Speed). From the checkout, with the prepared-from data beside it:
#
#   PYTHONPATH=. bash experiments/device_check.sh DATA_DIR
#
# DATA_DIR holds ml-100k-clover, ml-1m-clover and bookcrossing-clover. In order, each
# step held to what is left of DEADLINE seconds (default 480): a Book-Crossing MeLU+FAST
# epoch (bench.py: the default batching, whole batches, 5 seeds vmapped against one after
# another), the whole Table 2 (three datasets, 5 seeds, JOBS processes at once, default 6,
# --vmap) and, if time is left, the main command with its seeds as lanes. T2_ARGS replaces
# the Table 2 rows and datasets (a check of the script itself on a CPU:
# T2_ARGS="--datasets ml100k --rows melu-fast global-mean --epochs 1 --seeds 2").
# Programs and run folders go to WORK (default /tmp/device_check); the logs, the table and
# the runs' results (runs.tgz) to OUT (default WORK/out), at most 8 files; a short summary
# is printed last. `python` must be the one with JAX for the accelerator (on the lent H200
# of session 26: `export PATH=/opt/torch/.venv/bin:$PATH`; a symlink to that python loses
# its virtual environment). A tool that copies only a limited working tree may need the
# committed results/runs* folders (about 226 MB) left out: the script does not read them.
set -u
DATA=${1:?usage: device_check.sh DATA_DIR}
WORK=${WORK:-/tmp/device_check}
OUT=${OUT:-$WORK/out}
DEADLINE=${DEADLINE:-480}
JOBS=${JOBS:-6}
T2_ARGS=${T2_ARGS:---datasets ml100k ml1m bookcrossing}
mkdir -p "$WORK" "$OUT"
export FAST_JAX_CACHE="$WORK/cache"  # each program compiles once per call, shared by all
export PYTHONUNBUFFERED=1
START=$SECONDS
LOG=$OUT/log.txt

left() { echo $(( DEADLINE - (SECONDS - START) )); }

step() {  # step NAME SECONDS COMMAND...: run under a time limit, keep its output
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then
    printf '%-12s skipped (%d s left)\n' "$name" "$limit" >> "$LOG"; return
  fi
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  printf '%-12s rc=%d %5d s (limit %d s)\n' "$name" "$rc" $(( SECONDS - t0 )) "$limit" >> "$LOG"
}

{
  python -c "import jax; print('JAX', jax.__version__, jax.devices())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  nproc
} >> "$LOG" 2>&1

step bx_epoch $(( $(left) < 150 ? $(left) : 150 )) python experiments/bench.py \
  --dataset bookcrossing --data-dir "$DATA" --loop-steps 0 --seeds 5
# shellcheck disable=SC2086
step table2 $(( $(left) - 25 )) python experiments/table2.py $T2_ARGS --jobs "$JOBS" --vmap \
  --data-dir "$DATA" --root "$WORK/runs" --out "$OUT/table2"
if [ "$(left)" -gt 100 ]; then
  step main_vmap $(( $(left) - 15 )) python experiments/run.py --backbone melu \
    --dataset ml100k --gamma 2 --tau 0.2 --data-dir "$DATA" --vmap-seeds --quiet \
    --out "$WORK/main_vmap"
fi
(cd "$WORK/runs" 2>/dev/null && find . -name results.json -o -name wall_time.txt \
  | tar czf "$OUT/runs.tgz" -T -) >> "$LOG" 2>&1

{
  echo "== summary"
  grep -h -E "jitted epoch|by length|whole|vmapped|peak RSS:" "$OUT/bx_epoch.txt"
  grep -E "\([0-9]+ s\)$|runs in" "$OUT/table2.txt"
  head -3 "$OUT/main_vmap.txt" 2>/dev/null
  echo "total $(( SECONDS - START )) s"
} >> "$LOG" 2>&1
cat "$LOG"
