#!/usr/bin/env bash
# The main job the README gives: set up the virtualenv, then run the offline quickstart pipeline
# (`tracegen run recipes/quickstart.yaml`: a local SmolLM2 teacher served by `transformers serve`,
# then collect, filter, format, cache-teacher, distill, merge and eval, all offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/quickstart.py "$@"
