"""Run axolotl's ``type: chat_template`` dataset strategy on a tracegen dataset's ``messages`` column (a script).

    python tests/consumers/axolotl_chat_template.py DATASET_DIR TOKENIZER_DIR CHAT_TEMPLATE OUT.json

What an axolotl config with ``datasets: [{path: DATASET_DIR, type: chat_template, field_messages: messages,
field_tools: tools, chat_template: jinja, chat_template_jinja: ..., roles_to_train: [assistant],
train_on_eos: turn}]`` tokenizes, row by row (``StrategyLoader`` -> ``tokenize_prompt``). Writes each row's
``input_ids`` and ``labels`` to OUT.json. Its own process: axolotl is installed ``--no-deps`` (with its two
small import-time needs, colorama and addict), and its imports must not touch the test run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(dataset_dir: str, tokenizer_dir: str, chat_template: str, out: str) -> None:
    import datasets
    from axolotl.prompt_strategies.chat_template import StrategyLoader
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = DictDefault({"sequence_len": 1_000_000, "train_on_inputs": False})
    ds_cfg = {
        "type": "chat_template",
        "field_messages": "messages",
        "field_tools": "tools",
        "chat_template": "jinja",
        "chat_template_jinja": Path(chat_template).read_text(encoding="utf-8"),
        "roles_to_train": ["assistant"],
        "train_on_eos": "turn",
    }
    strategy = StrategyLoader()(tokenizer, cfg, ds_cfg)
    rows = []
    for row in datasets.load_dataset(dataset_dir, split="train"):
        example = dict(row, tools=json.loads(row["tools"]))  # the column is a JSON string; axolotl wants the list
        tokenized = strategy.tokenize_prompt(example)
        rows.append({"input_ids": list(tokenized["input_ids"]), "labels": list(tokenized["labels"])})
    with open(out, "w", encoding="utf-8") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    main(*sys.argv[1:5])
