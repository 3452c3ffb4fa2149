"""``tracegen push --model``: a distilled adapter, or its merge, with a model card built from the run's files.

A real (tiny, offline) distill run and merge make the folders; the upload goes to the loopback fake Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tracegen.distill.merge import merge_adapter
from tracegen.distill.model_card import model_card, push_model
from tracegen.distill.trainer import train
from tracegen.errors import BadInputError
from tracegen.evaluate import AnswerRow, EvalSummary
from tracegen.testing.fake_hub import FakeHub

from .conftest import tracegen
from .distill_fixtures import read_metrics, save_model, write_dataset
from .distill_fixtures import small_config as small
from .hub_fixtures import HUB_TOKEN as TOKEN

torch.set_num_threads(2)
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tracegen run`'s layout: work/adapter (distill), work/merged, work/eval/eval.json; the student in the
    Hub cache layout `resolve_model` hands distill."""
    root = tmp_path_factory.mktemp("run")
    student = save_model(root / "hub" / f"models--{BASE.replace('/', '--')}" / "snapshots" / "0123abc")
    dataset = write_dataset(root / "my-traces", student, n=8)
    (dataset / "tracegen.json").write_text(json.dumps({"license": "apache-2.0", "hub_repo_id": "org/my-traces"}))
    work = root / "work"
    train(small(student, eval_fraction=0.25, eval_every=2), dataset, work / "adapter")
    merge_adapter(work / "adapter", work / "merged")
    summary = EvalSummary(out=work / "eval", model="student")
    summary.rows = [_row(f"t{i}", correct=i < 3) for i in range(4)]
    (work / "eval").mkdir()
    (work / "eval" / "eval.json").write_text(json.dumps({"model": "student", "totals": summary.totals()}))
    return work


def _row(task: str, correct: bool) -> AnswerRow:
    return AnswerRow(task, 0, "stop", "answer", correct, {}, completion_tokens=50, turns=1, answer="x")


def test_adapter_is_pushed_with_a_card_of_its_recipe_losses_and_eval(run: Path, hub: FakeHub) -> None:
    from huggingface_hub import ModelCard

    assert push_model(run / "adapter", "org/student-lora", private=False) == "https://huggingface.co/org/student-lora"
    repo = hub.repos["model/org/student-lora"]
    assert repo["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert {"adapter_config.json", "metrics.jsonl", "tokenizer.json", "README.md"} <= set(repo)
    assert "distill_config.json" not in repo  # it holds local paths; the card tells the recipe
    card = ModelCard(repo["README.md"].decode())
    assert card.data.base_model == BASE and card.data.library_name == "peft"
    assert card.data.datasets == ["org/my-traces"] and card.data.license == "apache-2.0"
    assert "lora" in card.data.tags and card.data.pipeline_tag == "text-generation"
    metrics = read_metrics(run / "adapter")
    evals = [m["eval_loss"] for m in metrics if m["eval_loss"] is not None]
    assert f"loss {metrics[0]['loss']:.4f} at step 1 -> {metrics[-1]['loss']:.4f} at step 4 of 4" in card.text
    assert f"held-out loss: {evals[0]:.4f} first, {min(evals):.4f} best" in card.text
    assert "method `lora` (r=8, alpha=16, dropout=0.0)" in card.text and "6 training rows, 2 held out" in card.text
    assert "accuracy 75.0% (3/4 scored)" in card.text
    assert str(run.parent) not in card.text and "/tmp" not in card.text
    assert "## Model Details" not in card.text  # not PEFT's blank template
    # the local folder is left as distill wrote it
    assert "## Model Details" in (run / "adapter" / "README.md").read_text()


def test_merged_model_is_pushed_as_a_transformers_model(run: Path, hub: FakeHub) -> None:
    from huggingface_hub import ModelCard

    r = tracegen("push", "--model", str(run / "merged"), "--repo-id", "org/student", "--dataset-id", "org/other")
    assert r.returncode == 0, r.stderr
    repo = hub.repos["model/org/student"]
    assert repo["model.safetensors"] == (run / "merged" / "model.safetensors").read_bytes()
    card = ModelCard(repo["README.md"].decode())
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    assert card.data.datasets == ["org/other"] and card.data.base_model == BASE
    assert "with a distilled LoRA adapter merged in, trained with" in card.text
    assert TOKEN not in r.stdout + r.stderr


def test_a_folder_without_run_files_or_model_is_refused_before_any_request(
    run: Path, hub: FakeHub, tmp_path: Path
) -> None:
    with pytest.raises(BadInputError, match="neither an adapter"):
        model_card(tmp_path, "org/x")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match=r"no distill_config\.json"):
        push_model(bare, "org/x", private=False)
    r = tracegen("push", str(run / "adapter"), "--model", str(run / "adapter"), "--repo-id", "org/x")
    assert r.returncode == 2 and "one of them" in r.stderr
    assert hub.requests == []
