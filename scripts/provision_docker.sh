#!/usr/bin/env bash
# Give a fresh Debian machine what the Docker sandbox tests need: a running engine and the
# tracegen sandbox image. Idempotent: every step is skipped when its result is already there.
#
#   bash scripts/provision_docker.sh [PYTHON]      # PYTHON defaults to the repo's .venv/bin/python
#
# As root, when no engine answers: installs Debian's docker.io (which provides dockerd) and
# debootstrap, starts dockerd in the background (log: $TRACEGEN_DOCKERD_LOG), and waits for it.
# Then builds the sandbox image (`python:3.12-slim` when a registry answers, else a debootstrapped
# Debian base imported locally). Not root and no engine: says so and fails.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
LOG="${TRACEGEN_DOCKERD_LOG:-/var/log/tracegen-dockerd.log}"
WAIT_S="${TRACEGEN_DOCKERD_WAIT_S:-90}"

say() { echo "provision_docker: $*" >&2; }

# The Python that builds the image: the argument, else the venv scripts/setup_venv.sh makes.
if [ -n "${1:-}" ]; then
    PY="$1"
elif [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="$(command -v python3 || command -v python || echo python3)"
fi
if ! "$PY" -c "import typer, docker" >/dev/null 2>&1; then
    say "$PY cannot import tracegen's dependencies; run 'bash scripts/setup_venv.sh' first, or pass the venv's python"
    exit 1
fi

engine_up() { docker info >/dev/null 2>&1; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        say "$1 needs root; run this script as root or start a Docker engine yourself"
        exit 1
    fi
}

apt_install() {
    need_root "installing $*"
    say "installing $* from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

install_engine() {
    local missing=()
    # docker.io provides both dockerd and a docker client.
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
        missing+=(docker.io)
    fi
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    if [ "${#missing[@]}" -gt 0 ]; then
        apt_install "${missing[@]}"
    fi
}

start_dockerd() {
    need_root "starting dockerd"
    # A stale pid file from a killed daemon would make the new one refuse to start.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    if ! pgrep -x dockerd >/dev/null 2>&1; then
        say "starting dockerd (log: $LOG)"
        mkdir -p "$(dirname "$LOG")"
        nohup dockerd >>"$LOG" 2>&1 </dev/null &
        disown || true
    fi
    for _ in $(seq "$WAIT_S"); do
        engine_up && return 0
        sleep 1
    done
    say "dockerd did not answer within ${WAIT_S}s; last log lines:"
    tail -n 30 "$LOG" >&2 || true
    exit 1
}

if engine_up; then
    say "Docker engine answers"
else
    need_root "starting a Docker engine"
    install_engine
    start_dockerd
    say "dockerd is up"
fi
# The offline fallback of the image build needs debootstrap; without root it is simply not offered.
if ! command -v debootstrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt_install debootstrap
fi

cd "$ROOT"
"$PY" -m tracegen.cli sandbox build
