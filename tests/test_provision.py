"""The README's set-up commands as written: the provision script finds the venv; engine errors are whole."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _engine() -> object:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception:  # noqa: BLE001 - no engine: nothing to test here
        pytest.skip("no Docker engine answers")
    return client


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the repo's .venv")
def test_provision_script_finds_the_venv_without_it_on_path() -> None:
    _engine()
    env = {**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT)}  # no venv, no shims
    proc = subprocess.run(
        ["bash", "scripts/provision_docker.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "No module named" not in proc.stderr


def test_an_engine_error_is_reported_whole() -> None:
    from tracegen.runtime.image import _first_line

    client = _engine()
    with pytest.raises(Exception) as caught:  # no registry is reachable from this engine (or no such image)
        client.api.pull("tracegen-no-such-image-anywhere", tag="0")  # type: ignore[attr-defined]
    explanation = caught.value.explanation  # type: ignore[attr-defined]
    assert len(explanation) > 40 and _first_line(caught.value) == " ".join(explanation.split())
