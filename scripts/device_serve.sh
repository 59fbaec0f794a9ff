#!/usr/bin/env bash
# The request path as users see it, on the device machine (one GPU): spava-serve over a plan, driven by
# benchmarks/serve_load.py with real encoded clips. The plan's W ranks are emulated in the server's
# one process (threads sharing the GPU), so the GPU stages of a request are every rank's work in turn.
#   usage: scripts/device_serve.sh PLAN_JSON CLIPS REQUESTS CONCURRENCY [serve overrides...]; results under $OUT
# Wheels for what the device image lacks (fastapi, uvicorn, pydantic, openai, hydra, omegaconf, PyAV) in
# .whl, as scripts/device_prefill.sh takes them; spava_plan's package layout is recreated the same way.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
plan=$(realpath "$1") clips=$2 requests=$3 concurrency=$4; shift 4
PP=/tmp/spava_pp
if [ ! -d $PP/spava_plan ]; then
  mkdir -p $PP/spava_plan
  cp -r "$ROOT"/spava_plan/. $PP/spava_plan/
  for d in runtime planner codegen conf; do ln -sfn "$ROOT/$d" "$PP/spava_plan/$d"; done
fi
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spava_site "$ROOT"/.whl/*.whl
  export PYTHONPATH=/tmp/spava_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PP${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -n "${GPU_TESTS:-}" ]; then  # the GPU tests of the request path first (pixels on the GPU = on the CPU)
  # from /tmp: `python3 -m` puts the working directory first on sys.path, and the checkout's
  # spava_plan/ folder lacks the planner/codegen/runtime subpackages that $PP maps in
  (cd /tmp && timeout 180 python3 -m pytest -q -p no:cacheprovider -c "$ROOT/pyproject.toml" --rootdir "$ROOT" \
     $(for t in $GPU_TESTS; do case $t in tests/*) echo "$ROOT/$t";; *) echo "$t";; esac; done) > "$OUT/gpu_tests.log" 2>&1) \
    || echo "GPU tests failed (rc $?): see gpu_tests.log"
  tail -3 "$OUT/gpu_tests.log"
fi
media=/tmp/serve_media && mkdir -p $media
# The clips first (encoding a 2-minute 1440p clip takes a while): while they encode, the server starts.
python3 "$ROOT/benchmarks/serve_load.py" --make-clips-only --clips "$clips" --clip-dir $media > "$OUT/clips.log" 2>&1 &
clipper=$!
start=$(date +%s.%N)
cd /tmp  # not the checkout: see the GPU tests above
python3 -m spava_plan.server.serve plan="$plan" model.init=random device=cuda comm=emulated port=8000 \
  allowed_local_media_path=$media max_video_bytes=1073741824 "$@" > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf http://127.0.0.1:8000/health >/dev/null; do
  kill -0 $server 2>/dev/null || { echo "server exited"; tail -40 "$OUT/server.log"; exit 1; }
  sleep 1
done
ready=$(date +%s.%N)
echo "ready after $(python3 -c "print(f'{$ready - $start:.1f}')") s (model load, plan, kernels tuned and compiled, one warm run)" | tee "$OUT/ready.txt"
wait $clipper || { cat "$OUT/clips.log"; exit 1; }
python3 "$ROOT/benchmarks/serve_load.py" --url http://127.0.0.1:8000 --model "$(python3 -c "import json;print(json.load(open('$plan'))['model']['name'])")" \
  --clips "$clips" --clip-dir $media --requests "$requests" --concurrency "$concurrency" --media file \
  --max-tokens "${MAX_TOKENS:-16}" \
  --out "$OUT/serve.json" 2>&1 | tee "$OUT/load.log"
