"""Run LLaMA-Factory's own SFT data pipeline on a tracegen dataset folder (a script, run in its own process).

    python tests/consumers/llamafactory_sft.py DATASET_DIR TOKENIZER_DIR OUT.json

What a LLaMA-Factory user runs with ``dataset: tracegen, dataset_dir: DATASET_DIR, template: qwen3``:
its ``dataset_info.json`` lookup, sharegpt converter, qwen3 template and supervised processor
(``llamafactory.data.get_dataset``). Writes each row's ``input_ids`` and ``labels`` to OUT.json.

Its own process because of two stand-ins that must not leak into the test run: ``llamafactory`` is
installed with ``--no-deps`` and its multimodal plugin imports ``torchaudio`` at module level (text
data never reaches it), so an empty module stands in; and it pins ``transformers<=5.6``, a check
``DISABLE_VERSION_CHECK=1`` (its documented switch) turns off.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import tempfile
import types

os.environ["DISABLE_VERSION_CHECK"] = "1"
stub = types.ModuleType("torchaudio")
stub.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
sys.modules["torchaudio"] = stub


def main(dataset_dir: str, tokenizer_dir: str, out: str) -> None:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import AutoTokenizer, Seq2SeqTrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data_args = DataArguments(dataset="tracegen", dataset_dir=dataset_dir, template="qwen3", cutoff_len=1_000_000)
    with tempfile.TemporaryDirectory() as scratch:
        training_args = Seq2SeqTrainingArguments(output_dir=scratch, report_to=[])
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        module = get_dataset(
            template, ModelArguments(model_name_or_path=tokenizer_dir), data_args, training_args, "sft", tokenizer
        )
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in module["train_dataset"]]
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
