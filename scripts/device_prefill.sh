#!/usr/bin/env bash
# The prefill + kernel benchmarks on the device machine (one H100), from a copy of this checkout.
# Plans are made beforehand on a CPU machine with hydra (benchmarks/prefill.py plan, kernel_speed.py
# make-plans); the device needs only torch + triton + transformers. spava_plan's package layout
# (spava_plan.runtime = runtime/, ...) is recreated under /tmp/spava_pp instead of pip-installing.
#   usage: scripts/device_prefill.sh STAGE [ARGS...]; results under $OUT
#   STAGE prefill PLANS [measure args...]   every method of the plans' manifest, each in its own process
#   STAGE kernels KPLANS [kernel_speed.py run args...]
#   STAGE vision [vision_speed.py args...]
#   STAGE profile PLAN [profile_rank.py args...]   one rank alone, phase by phase, with a kernel profile
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PP=/tmp/spava_pp
if [ ! -d $PP/spava_plan ]; then
  mkdir -p $PP/spava_plan
  cp -r "$ROOT"/spava_plan/. $PP/spava_plan/
  for d in runtime planner codegen conf; do ln -sfn "$ROOT/$d" "$PP/spava_plan/$d"; done
fi
# load_plan validates the plan's config against the schema (omegaconf); the device image has no
# omegaconf/hydra: carry their wheels in .whl (README "Benchmarks" says how to download them).
if ! python3 -c "import omegaconf" 2>/dev/null && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/spava_site "$ROOT"/.whl/*.whl
  export PYTHONPATH=/tmp/spava_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PP${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
stage=$1; shift
case $stage in
  prefill) plans=$1; shift
    python3 "$ROOT/benchmarks/prefill.py" measure --plans "$plans" --out "$OUT/${RUNS:-runs.jsonl}" "$@" ;;
  kernels) kplans=$1; shift
    python3 "$ROOT/benchmarks/kernel_speed.py" run "$kplans" --out "$OUT" "$@" ;;
  vision) python3 "$ROOT/benchmarks/vision_speed.py" "$@" ;;
  profile) python3 "$ROOT/benchmarks/profile_rank.py" "$@" --out "$OUT" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
