"""Tiny offline models, tokenizers and formatted datasets for the distill tests (nothing downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CORPUS = [
    "Proof. Let n be an even integer, so n = 2k and n squared is 4k squared, which is even.",
    "The answer is 42 because six times seven is forty two.",
    "We show the sum of two odd numbers is even: (2a+1) + (2b+1) = 2(a+b+1).",
    "User: what is 3 + 4? Assistant: 3 + 4 = 7.",
    "Therefore the claim holds for every natural number by induction on n.",
]


def build_tokenizer(vocab_size: int = 160, corpus: list[str] | None = None) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def build_model(vocab_size: int, seed: int = 0, arch: str = "qwen3", init_range: float = 0.3) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "tie_word_embeddings": arch == "llama",
        "initializer_range": init_range,  # 0.3: larger output rows, so a LoRA on a 32-wide model can move the logits
    }
    config = Qwen3Config(**kwargs) if arch == "qwen3" else LlamaConfig(**kwargs)
    return AutoModelForCausalLM.from_config(config)


def save_model(
    path: Path,
    vocab_size: int = 160,
    seed: int = 0,
    arch: str = "qwen3",
    corpus: list[str] | None = None,
    init_range: float = 0.3,
) -> Path:
    tokenizer = build_tokenizer(vocab_size, corpus)
    model = build_model(len(tokenizer), seed, arch, init_range)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_dataset(path: Path, tokenizer_dir: Path, n: int = 12, seed: int = 0) -> Path:
    """Rows like `tracegen format` writes: prompt masked, answer trained, its middle part proof."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(seed)
    records: dict[str, list[Any]] = {"id": [], "text": [], "input_ids": [], "labels": [], "proof_mask": []}
    for i in range(n):
        prompt = tokenizer(f"User: {rng.choice(CORPUS)} Assistant:")["input_ids"]
        answer = tokenizer(" " + rng.choice(CORPUS))["input_ids"]
        ids = prompt + answer
        labels = [-100] * len(prompt) + answer
        third = len(answer) // 3
        proof = [0] * len(prompt) + [0] * third + [1] * (len(answer) - 2 * third) + [0] * third
        records["id"].append(f"r{i}")
        records["text"].append(tokenizer.decode(ids))
        records["input_ids"].append(ids)
        records["labels"].append(labels)
        records["proof_mask"].append(proof)
    (path / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(records), path / "data" / "train-00000-of-00001.parquet")
    return path


def small_config(student: Path, **overrides: Any) -> Any:
    """A DistillConfig for tiny fixture models: rank-8 adapter, 4 steps of 2 x 2 rows, a high LR."""
    from tracegen.config import DistillConfig, LoraSettings

    base: dict[str, Any] = {
        "student": str(student),
        "lora": LoraSettings(r=8, alpha=16, dropout=0.0),
        "batch_size": 2,
        "grad_accum": 2,
        "max_steps": 4,
        "learning_rate": 1e-2,
        "min_learning_rate": 1e-3,
        "eval_fraction": 0.0,
    }
    base.update(overrides)
    return DistillConfig(**base)


def read_metrics(out: Path) -> list[dict[str, Any]]:
    """The adapter folder's metrics.jsonl, one dict per optimizer step."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
