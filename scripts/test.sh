#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k layout`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch + torchvision first, as one pinned pair: transformers' fast video / image processors (the
# path real checkpoints and GPU preprocessing take) need torchvision, and torchvision's compiled ops
# load only against the torch build they were made for. No CPU torchvision exists on PyPI: the
# torchvision 0.28 wheel links libtorch_cuda.so, which the CPU torch 2.13 lacks ("operator
# torchvision::nms does not exist"), so CI takes the CUDA build torch 2.14.1 with torchvision
# 0.29.1 (both lie on this machine's disk; about 1.5 minutes to install, 5.5 GB; it runs on a CPU
# without a GPU). Pinned, so pip never fetches another torch. Skipped when a working pair is already
# installed (e.g. a GPU machine).
tv_ok() { python -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)" 2>/dev/null; }
tv_ok || python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e ".[model,serve,test]"
tv_ok || { echo "torch / torchvision do not load together: $(python -c 'import torch, torchvision' 2>&1 | tail -1)" >&2; exit 1; }
python -m pytest -q --durations=30 tests "$@"
