"""tracegen push: token and input checks before any work, then the two Hub calls (recorded by a fake API)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tracegen.config import FormatConfig
from tracegen.data.format import format_dataset
from tracegen.data.hub import push_dataset
from tracegen.errors import BadInputError, TracegenError
from tracegen.testing.synthetic import write_trajectories

from .conftest import tracegen

TOKEN = "hf_SECRET_token_do_not_leak_123"


@pytest.fixture
def dataset(tiny_tokenizer: Path, tmp_path: Path) -> Path:
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 3)
    out = tmp_path / "ds"
    format_dataset(src, out, FormatConfig(template="proof", tokenizer=str(tiny_tokenizer)))
    return out


class FakeHub:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail = fail

    def create_repo(self, repo_id: str, *, repo_type: str, private: bool, exist_ok: bool) -> None:
        self.calls.append(("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "private": private}))

    def upload_folder(self, *, repo_id: str, folder_path: str, repo_type: str, commit_message: str) -> None:
        if self.fail:
            raise RuntimeError(f"401 Unauthorized for token {TOKEN}")
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", {"repo_id": repo_id, "repo_type": repo_type, "files": files}))


def test_push_without_token_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    r = tracegen("push", str(tmp_path / "does-not-exist"), "--repo-id", "org/name")
    assert r.returncode == 2 and "HF_TOKEN is not set" in r.stderr


def test_push_uploads_folder_and_card(dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = FakeHub()
    url = push_dataset(dataset, "org/proofs", private=True, api=hub)
    assert url == "https://huggingface.co/datasets/org/proofs"
    assert hub.calls[0] == ("create_repo", {"repo_id": "org/proofs", "repo_type": "dataset", "private": True})
    name, args = hub.calls[1]
    assert name == "upload_folder" and args["repo_type"] == "dataset"
    assert "README.md" in args["files"] and "tracegen.json" in args["files"]
    assert any(f.startswith("data/train-") for f in args["files"])
    card = (dataset / "README.md").read_text()
    assert 'load_dataset("org/proofs"' in card and TOKEN not in card


def test_push_checks_repo_id_and_folder_then_hides_the_token(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(BadInputError, match="ORG/NAME"):
        push_dataset(dataset, "just-a-name", private=False, api=FakeHub())
    with pytest.raises(BadInputError, match="not a tracegen dataset"):
        push_dataset(tmp_path, "org/x", private=False, api=FakeHub())
    with pytest.raises(TracegenError) as info:
        push_dataset(dataset, "org/x", private=False, api=FakeHub(fail=True))
    assert TOKEN not in info.value.message and "401" in info.value.message
