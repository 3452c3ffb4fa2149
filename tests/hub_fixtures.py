"""The fake Hub on loopback (``tracegen.testing.fake_hub``), for the dataset and model push tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tracegen.testing.fake_hub import FakeHub, serve

HUB_TOKEN = "hf_SECRET_token_do_not_leak_789"
"""The token the fake Hub's users hold: it must reach no message, file or card."""


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A fake Hub on loopback, as HF_ENDPOINT for subprocesses and huggingface_hub's endpoint in-process;
    HF_TOKEN set to :data:`HUB_TOKEN`, HF_HOME a fresh folder (never the machine's own login), offline
    mode off."""
    from huggingface_hub import constants

    fake = FakeHub()
    server, url = serve(fake)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    # The suite runs offline (scripts/test.sh); pushing to this loopback Hub is the one thing that must not.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield fake
    server.shutdown()
    server.server_close()
