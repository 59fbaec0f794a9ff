#!/usr/bin/env bash
# Set up a virtual environment with everything the tests need, then run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k layout`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: on a CPU machine this is the local CPU wheel; an unpinned torch would pull
# several GB of CUDA packages. Skip when a torch is already installed (e.g. a GPU machine).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[model,serve,test]"
python -m pytest -q tests "$@"
