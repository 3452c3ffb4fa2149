#!/usr/bin/env bash
# The test command the README gives: set up the virtualenv, then run the whole suite (slow tests
# included: the real `transformers serve` teacher, the kill -9 resume test, the Docker sandbox).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
