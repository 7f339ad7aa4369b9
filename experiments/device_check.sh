#!/usr/bin/env bash
# The GPU figures of issue 17 in one call, for a lent accelerator with no internet
# (EXPERIMENTS.md, Speed). From the checkout, with the prepared-from data beside it:
#
#   PYTHONPATH=. bash experiments/device_check.sh DATA_DIR
#
# DATA_DIR holds ml-100k-clover and bookcrossing-clover (ml-1m-clover is timed when
# present). QUICK=1 skips the Table 2 block (a check of the script itself on a CPU).
# Full outputs go to $OUT (default /tmp/device_check); a short table is printed last.
set -u
DATA=${1:?usage: device_check.sh DATA_DIR}
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
export FAST_JAX_CACHE="$OUT/cache"  # each program compiles once per call, shared by all
START=$(date +%s)

step() {  # step NAME COMMAND...: run, keep its output, note its wall time
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  printf '%-22s rc=%d %5d s\n' "$name" "$rc" $(( SECONDS - t0 )) >> "$OUT/steps.txt"
}

python -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/backend.txt" 2>&1
# A Book-Crossing MeLU+FAST epoch (default batching; bench also times whole batches and
# 5 seeds vmapped against one after another).
step bx_epoch python experiments/bench.py --dataset bookcrossing --data-dir "$DATA" \
  --loop-steps 0 --seeds 5
if [ -d "$DATA/ml-1m-clover" ]; then
  step ml1m_epoch python experiments/bench.py --dataset ml1m --data-dir "$DATA" --loop-steps 0
fi
# The main command, its seeds as lanes.
step main_vmap python experiments/run.py --backbone melu --dataset ml100k --gamma 2 \
  --tau 0.2 --data-dir "$DATA" --vmap-seeds --quiet --out "$OUT/main_vmap"
if [ "${QUICK:-0}" != 1 ]; then
  # The ML-100K Table 2 block: each backbone's Origin/Reg/IPW/FAST rows x 5 seeds as one
  # program (rows as lanes), CLOVER's seeds as lanes, three processes at once.
  step t2_ml100k_vmap python experiments/bench.py --table2 ml100k --jobs 3 --vmap \
    --data-dir "$DATA"
fi

echo "== $(cat "$OUT/backend.txt" | tail -1)"
cat "$OUT/steps.txt"
grep -h -E "jitted epoch|by length|vmapped|peak RSS:" "$OUT/bx_epoch.txt" "$OUT/ml1m_epoch.txt" \
  2>/dev/null
head -3 "$OUT/main_vmap.txt"  # the main command's results (CPU: 0.852 MAE, 0.079 GF(MAE))
cat "$OUT/t2_ml100k_vmap.txt" 2>/dev/null | grep -A20 "^Table 2 block"
echo "total $(( $(date +%s) - START )) s"
