"""Help that tells the truth: real metavars, and defaults read from the settings (never repeated in text)."""

from __future__ import annotations

import os
import re

import pytest

from tracegen.config import CollectConfig, DistillConfig

from .conftest import tracegen

COMMANDS = [
    ["collect"], ["filter"], ["format"], ["audit"], ["eval"], ["run"], ["serve"], ["push"],
    ["distill", "train"], ["distill", "cache-teacher"], ["distill", "merge"], ["sandbox", "build"], ["distill"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_real_metavars_and_no_hand_written_numeric_defaults(command: list[str]) -> None:
    proc = tracegen(*command, "--help", env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout and "<list[" not in proc.stdout, proc.stdout
    assert not re.search(r"\(default \d", proc.stdout), "a default written into help text drifts from the settings"


def test_defaults_shown_are_the_settings_defaults() -> None:
    collect = tracegen("collect", "--help", env={**os.environ, "COLUMNS": "200"}).stdout
    assert f"Trajectories in flight. [default: ({CollectConfig().concurrency})]" in collect
    train = tracegen("distill", "train", "--help", env={**os.environ, "COLUMNS": "200"}).stdout
    assert f"LoRA rank. [default: ({DistillConfig().lora.r})]" in train


def test_fake_server_help_says_what_it_scripts() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "tracegen.testing.fake_server", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "TURNS-1 replies carries" in " ".join(out.split()) and "python" in out and "(default: 4)" in out
