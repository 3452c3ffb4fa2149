"""The dataset card (read back with huggingface_hub and datasets) and ``tracegen push`` against a loopback Hub.

The fake Hub (``tracegen.testing.fake_hub``) answers the requests ``huggingface_hub`` really sends
(create repo, validate README, preupload, NDJSON commit), so ``push`` runs its production path:
the token from ``get_token()``, ``HfApi.create_repo`` and ``create_commit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest

from tracegen.config import FormatConfig, ImportColumns
from tracegen.data.format import format_dataset
from tracegen.data.hub import push_dataset
from tracegen.errors import BadInputError, TracegenError
from tracegen.testing.fake_hub import FakeHub
from tracegen.testing.synthetic import make_trajectory, write_trajectories

from .conftest import tracegen
from .hub_fixtures import HUB_TOKEN as TOKEN

LICENSE = {"license": "other", "license_name": "teacher-terms-1.0", "license_link": "https://example.com/terms"}

# The top-level keys of the Hub's dataset card metadata spec (hub-docs datasetcard.md, which
# huggingface_hub's DatasetCardData docstring and datasetcard_template.md point to).
SPEC_KEYS = {
    "language", "license", "license_name", "license_link", "license_details", "tags", "annotations_creators",
    "language_creators", "language_details", "pretty_name", "size_categories", "source_datasets",
    "task_categories", "task_ids", "paperswithcode_id", "configs", "dataset_info", "extra_gated_fields",
    "extra_gated_prompt", "train-eval-index",
}  # fmt: skip
# DatasetCardData's documented size_categories options
SIZES = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B", "1B<n<10B"}


def fmt(src: Path, out: Path, tokenizer: Path, **settings: object) -> Path:
    format_dataset(src, out, FormatConfig(template="proof", tokenizer=str(tokenizer), **settings))  # type: ignore[arg-type]
    return out


@pytest.fixture
def dataset(tiny_tokenizer: Path, tmp_path: Path) -> Path:
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 3)
    return fmt(src, tmp_path / "proofs", tiny_tokenizer, **LICENSE)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def authorizations(fake: FakeHub) -> set[str | None]:
    """The Authorization headers of the repo and commit requests (not huggingface_hub's own side requests)."""
    return {auth for _, path, auth in fake.requests if path == "/api/repos/create" or "/commit/" in path}


# ---------------------------------------------------------------------------------------------------
# The card


def test_card_is_hub_metadata_that_huggingface_hub_and_datasets_read_back(tiny_tokenizer: Path, tmp_path: Path) -> None:
    from datasets import Features, load_dataset
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCard

    # a tokenizer that names itself by a local absolute path, as transformers' save_pretrained can
    tok = tmp_path / "my-student-tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((tiny_tokenizer / "tokenizer.json").read_bytes())
    config = json.loads((tiny_tokenizer / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**config, "name_or_path": str(tok)}))
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 3)
    out = fmt(src, tmp_path / "my-proofs", tok, export=["sharegpt"], **LICENSE)

    text = (out / "README.md").read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    card = DatasetCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert set(meta) <= SPEC_KEYS, set(meta) - SPEC_KEYS
    assert meta["license"] == "other" and meta["license_name"] == "teacher-terms-1.0"
    assert meta["license_link"] == "https://example.com/terms"
    assert meta["pretty_name"] == "my-proofs" and "\n# my-proofs\n" in card.text
    assert meta["size_categories"] == ["n<1K"] and set(meta["size_categories"]) <= SIZES
    assert [c["config_name"] for c in meta["configs"]] == ["default", "sharegpt"]
    assert meta["configs"][1]["data_files"] == [{"split": "train", "path": "sharegpt/train-*.parquet"}]
    assert "Tokenizer: `my-student-tok`" in card.text

    # dataset_info as `datasets` reads it: the features of the shards, the row counts, the sizes
    infos = DatasetInfosDict.from_dataset_card_data(card.data)
    import pyarrow.parquet as pq

    for name, folder in (("default", "data"), ("sharegpt", "sharegpt")):
        shards = sorted((out / folder).glob("*.parquet"))
        assert infos[name].features == Features.from_arrow_schema(pq.read_schema(shards[0]))
        assert infos[name].splits["train"].num_examples == 3
        assert infos[name].download_size == sum(f.stat().st_size for f in shards)
    assert load_dataset(str(out), split="train").num_rows == 3
    assert load_dataset(str(out), "sharegpt", split="train").column_names == ["id", "conversations", "system", "tools"]


def test_card_tells_imported_cot_apart_and_claims_no_setting_that_was_not_sent(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    from huggingface_hub import DatasetCard

    src = tmp_path / "cot.jsonl"
    src.write_text("".join(json.dumps({"q": f"q{i}", "cot": f"think {i}", "a": f"a{i}"}) + "\n" for i in range(3)))
    columns = ImportColumns(question="q", reasoning="cot", answer="a", source="org/some-cot-set")
    card = DatasetCard.load(
        fmt(src, tmp_path / "imp", tiny_tokenizer, import_format="cot", import_columns=columns) / "README.md"
    )
    assert "imported from `org/some-cot-set` (not sampled by tracegen)" in card.text
    assert "sampling settings are unknown" in card.text
    assert "temperature" not in card.text and "max_tokens" not in card.text
    assert card.data.source_datasets == ["org/some-cot-set"]

    # a teacher run with temperature and top_p not sent (null): the card lists only what was sent
    t = make_trajectory(0)
    sampling = t.teacher.sampling.model_copy(update={"temperature": None, "top_p": None, "max_tokens": 256})
    t = t.model_copy(update={"teacher": t.teacher.model_copy(update={"sampling": sampling})})
    (tmp_path / "one.jsonl").write_text(t.model_dump_json() + "\n")
    text = (fmt(tmp_path / "one.jsonl", tmp_path / "one", tiny_tokenizer) / "README.md").read_text()
    assert "(1 samples; sent max_tokens=256)" in text and "temperature" not in text


# ---------------------------------------------------------------------------------------------------
# push


def test_push_uploads_every_file_and_the_card_for_the_repo(dataset: Path, hub: FakeHub) -> None:
    fake = hub
    before = (dataset / "README.md").read_text()
    assert push_dataset(dataset, "org/proofs", private=True) == "https://huggingface.co/datasets/org/proofs"
    repo = fake.repos["dataset/org/proofs"]
    local = {str(p.relative_to(dataset)) for p in dataset.rglob("*") if p.is_file()}
    assert set(repo) == local
    for name in local - {"README.md", "tracegen.json"}:
        assert repo[name] == (dataset / name).read_bytes(), name
    # tracegen.json goes up with its local paths reduced to names (the tokenizer was given by path)
    local_meta = json.loads((dataset / "tracegen.json").read_text())
    assert local_meta["tokenizer"]["path"].startswith("/")
    assert str(dataset.parent.parent) not in repo["tracegen.json"].decode()
    assert json.loads(repo["tracegen.json"])["tokenizer"]["vocab_hash"] == local_meta["tokenizer"]["vocab_hash"]
    card = repo["README.md"].decode()
    assert 'load_dataset("org/proofs"' in card and "\n# proofs\n" in card and TOKEN not in card
    assert 'load_dataset("org/proofs"' not in before
    # after the Hub accepted it, the local card is the pushed one and tracegen.json remembers the repo
    assert (dataset / "README.md").read_text() == card
    assert json.loads((dataset / "tracegen.json").read_text())["hub_repo_id"] == "org/proofs"
    assert authorizations(fake) == {f"Bearer {TOKEN}"}


def test_push_uses_the_token_hf_auth_login_saved(dataset: Path, hub: FakeHub, tmp_path: Path) -> None:
    fake = hub
    saved = "hf_saved_by_login_456"
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(saved)  # where `hf auth login` writes it
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    r = tracegen("push", str(dataset), "--repo-id", "org/proofs", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "https://huggingface.co/datasets/org/proofs"
    assert authorizations(fake) == {f"Bearer {saved}"}


def test_push_in_offline_mode_is_refused_before_any_request(dataset: Path, hub: FakeHub) -> None:
    """HF_HUB_OFFLINE (set by many offline set-ups, this suite's included) names itself, not "the network"."""
    before = snapshot(dataset)
    r = tracegen("push", str(dataset), "--repo-id", "org/proofs", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "offline mode is on" in r.stderr and "unset HF_HUB_OFFLINE" in r.stderr
    assert hub.requests == [] and snapshot(dataset) == before


@pytest.mark.parametrize(
    ("status", "said"),
    [
        (401, "refused (401): the Hub does not accept the token"),
        (403, "refused (403): the token may not create or write dataset repos in 'org'"),
        (500, "the Hub answered 500 on 3 attempt(s)"),
    ],
)
def test_a_refused_or_failing_push_leaves_the_folder_as_it_was(
    dataset: Path, hub: FakeHub, status: int, said: str
) -> None:
    fake = hub
    fake.statuses = [status] * 10
    before = snapshot(dataset)
    with pytest.raises(TracegenError) as info:
        push_dataset(dataset, "org/proofs", private=False, retry_wait_s=0)
    assert said in info.value.message and TOKEN not in info.value.message + (info.value.hint or "")
    assert snapshot(dataset) == before
    assert not fake.repos.get("dataset/org/proofs")
    if status == 500:
        assert [p for _, p, _ in fake.requests].count("/api/repos/create") == 3


def test_push_retries_a_5xx_then_succeeds(dataset: Path, hub: FakeHub) -> None:
    fake = hub
    fake.statuses = [500, 503]
    push_dataset(dataset, "org/proofs", private=False, retry_wait_s=0)
    assert "README.md" in fake.repos["dataset/org/proofs"]


def test_push_explains_an_unreachable_hub_as_a_network_failure(
    dataset: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the suite runs offline; this push must try the network
    before = snapshot(dataset)
    r = tracegen("push", str(dataset), "--repo-id", "org/proofs")
    assert r.returncode == 1
    assert f"could not reach http://127.0.0.1:{port}" in r.stderr and "network failure, not the token" in r.stderr
    assert TOKEN not in r.stderr + r.stdout and "HF_TOKEN's write access" not in r.stderr
    assert snapshot(dataset) == before


def test_push_checks_token_repo_id_folder_and_license_before_any_request(
    dataset: Path, tiny_tokenizer: Path, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = hub
    with pytest.raises(BadInputError, match="ORG/NAME"):
        push_dataset(dataset, "just-a-name", private=False)
    with pytest.raises(BadInputError, match="not a tracegen dataset"):
        push_dataset(tmp_path / "nothing", "org/x", private=False)
    src = tmp_path / "t2.jsonl"
    write_trajectories(str(src), 2)
    unlicensed = fmt(src, tmp_path / "unlicensed", tiny_tokenizer)  # license: other, no name or link
    with pytest.raises(BadInputError, match="license is 'other' without license_name and license_link"):
        push_dataset(unlicensed, "org/x", private=False)
    monkeypatch.delenv("HF_TOKEN")
    r = tracegen("push", str(dataset), "--repo-id", "org/name")
    assert r.returncode == 2 and "no Hugging Face token" in r.stderr and "hf auth login" in r.stderr
    assert fake.requests == []
