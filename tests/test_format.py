"""tracegen format: spans, tokens, masks and the dataset folder, on real tokenizers (tiny BPE, Qwen3, SmolLM2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tracegen.config import FormatConfig
from tracegen.data.format import format_dataset, sharegpt_row
from tracegen.data.hub import read_rows
from tracegen.data.templates import (
    DROPPABLE,
    DUALMIND,
    PROOF_HEAD,
    PROOF_MID,
    PROOF_TAIL,
    MaskPolicy,
    compile_chat_template,
    render_chat,
    render_dualmind,
    render_instruct,
    render_proof,
)
from tracegen.data.tokenize import Stats, load_tokenizer, tokenize_batch
from tracegen.errors import BadInputError
from tracegen.records import AssistantMessage
from tracegen.testing.synthetic import HOSTILE, make_trajectory, write_trajectories

from .conftest import tracegen


def _check_row(row: dict, tok_spec: str) -> None:
    """The invariants every formatted row must satisfy."""
    tok = load_tokenizer(tok_spec)
    text = row["text"]
    pos = 0
    for sp in row["spans"]:
        assert sp.start == pos and sp.end > sp.start
        pos = sp.end
    assert pos == len(text)
    ids, labels = row["input_ids"], row["labels"]
    assert len(ids) == len(labels) == len(row["proof_mask"])
    assert tok.decode(ids) == text
    trained = labels != -100
    assert trained.any() and np.array_equal(labels[trained], ids[trained])


@pytest.mark.parametrize("template", ["proof", "dualmind", "instruct", "chat"])
def test_every_template_covers_text_and_round_trips(template: str, tiny_tokenizer: Path) -> None:
    tok = load_tokenizer(str(tiny_tokenizer))
    policy = MaskPolicy()
    trajs = [make_trajectory(i, source="mixed") for i in range(6)]
    if template == "chat":
        chat = compile_chat_template(tok.chat_template or "", tok.special_map, tok.eos)
        rendered = [render_chat(t, policy, chat) for t in trajs]
    elif template == "dualmind":
        rendered = [render_dualmind(t, policy, tok.eos, "Checked every step.") for t in trajs]
    else:
        fn = render_proof if template == "proof" else render_instruct
        rendered = [fn(t, policy, tok.eos) for t in trajs]
    rows = tokenize_batch(rendered, tok, None, Stats())
    for row in rows:
        assert row is not None
        _check_row(row, str(tiny_tokenizer))
        last_trained = np.flatnonzero(row["labels"] != -100)[-1]
        assert row["input_ids"][last_trained] == tok.eos_id  # the closing EOS / end-of-turn is trained
        if template != "chat":
            assert last_trained == len(row["input_ids"]) - 1


def test_proof_text_is_exact_and_masks_the_prompt() -> None:
    t = make_trajectory(1, turns=2)
    r = render_proof(t, MaskPolicy(), "<|im_end|>")
    text = r.text
    assert text.startswith(PROOF_HEAD + t.task.prompt + PROOF_MID)
    assert (
        PROOF_TAIL + (t.final_answer or "") + "<|im_end|>"
        == text[-len(PROOF_TAIL + (t.final_answer or "") + "<|im_end|>") :]
    )
    by_kind = {s.kind: s for s in r.spans()}
    assert not by_kind["prompt"].train and by_kind["reasoning"].train and by_kind["tool_call"].train
    assert '<tool_call>\n{"name": "python", "arguments": {"code":' in text
    assert "<tool_response>\n" in text
    d = render_dualmind(t, MaskPolicy(), "</s>", "crit")
    assert d.text.startswith(DUALMIND[0] + t.task.prompt + DUALMIND[1])
    assert "\n</explore>\n\n<examine>\ncrit\n</examine>\n\n<response>\n" in d.text and d.text.endswith(
        "\n</response></s>"
    )


def test_proof_mask_covers_the_derivation_only(tiny_tokenizer: Path) -> None:
    tok = load_tokenizer(str(tiny_tokenizer))
    r = render_proof(make_trajectory(2), MaskPolicy(), tok.eos)
    row = tokenize_batch([r], tok, None, Stats())[0]
    assert row is not None
    text, pm = row["text"], row["proof_mask"]
    first, last = np.flatnonzero(pm)[[0, -1]]
    prefix = tok.decode(row["input_ids"][:first])
    assert prefix.endswith(PROOF_MID) or PROOF_MID.strip() in prefix
    assert PROOF_TAIL.strip() not in tok.decode(row["input_ids"][: last + 1])
    assert text.index("Proof:") < len(tok.decode(row["input_ids"][: first + 1]))


@pytest.mark.parametrize("tok_spec", ["qwen3", "smollm2"])
def test_hostile_special_tokens_inside_content_are_text(tok_spec: str) -> None:
    """A tool output, prompt or answer holding <|im_end|>, <tool_call>, </think> must not become control tokens."""
    tok = load_tokenizer(tok_spec)
    if tok.chat_template is None:
        pytest.skip("no chat template")
    chat = compile_chat_template(tok.chat_template, tok.special_map, tok.eos)
    traj = make_trajectory(3, turns=3, hostile=True)
    allow = frozenset(DROPPABLE)  # SmolLM2's template renders neither reasoning nor tool calls
    r = render_chat(traj, MaskPolicy(), chat, allow)
    row = tokenize_batch([r], tok, None, Stats())[0]
    assert row is not None
    ids = row["input_ids"]
    assert tok.decode(ids) == row["text"]
    assert row["text"].count(HOSTILE) >= 3  # prompt, observations, answer: all kept verbatim
    clean = tokenize_batch([render_chat(make_trajectory(3, turns=3), MaskPolicy(), chat, allow)], tok, None, Stats())[0]
    assert clean is not None
    for control in ("<|im_end|>", "<|im_start|>", "<tool_call>", "</think>"):
        cid = tok.added.get(control)
        if cid is None:
            continue
        # the hostile sample has exactly as many control tokens as the clean one: none came from content
        assert int((ids == cid).sum()) == int((clean["input_ids"] == cid).sum()), control
    # the default path (tokenizing the text) would have turned them into control tokens
    naive = tok.full.encode(row["text"], add_special_tokens=False).ids
    assert naive.count(tok.added["<|im_end|>"]) > int((ids == tok.added["<|im_end|>"]).sum())


def test_simulated_observations_are_never_trained(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 6, source="mixed")
    result = format_dataset(
        src,
        tmp_path / "ds",
        FormatConfig(template="proof", tokenizer=str(tiny_tokenizer), train_observations="executed"),
    )
    rows = read_rows(tmp_path / "ds").to_pylist()
    seen = set()
    for row in rows:
        for sp in row["spans"]:
            if sp["kind"] == "observation":
                seen.add(sp["source"])
                assert sp["train"] == (sp["source"] == "executed")
    assert seen == {"executed", "simulated"}
    assert result.stats.kind_trained["observation"] > 0
    r = tracegen(
        "format",
        str(src),
        "--out",
        str(tmp_path / "x"),
        "--tokenizer",
        str(tiny_tokenizer),
        "--train-observations",
        "all",
    )
    assert r.returncode == 2 and "simulated observations can never be trained" in r.stderr
    assert not (tmp_path / "x").exists()


def test_chat_masks_equal_trl_on_real_qwen3() -> None:
    """Same trained positions as TRL's assistant mask with its Qwen3 training template (read from the wheel),
    except the newline after <|im_end|>, which tracegen does not train (the model never generates it)."""
    import importlib.util

    from transformers import AutoTokenizer

    from tracegen.data.templates import chat_messages

    spec = importlib.util.find_spec("trl")
    assert spec is not None and spec.submodule_search_locations
    trl_template = (
        Path(next(iter(spec.submodule_search_locations))) / "chat_templates/qwen3_training.jinja"
    ).read_text()
    tok = load_tokenizer("qwen3")
    hf = AutoTokenizer.from_pretrained(str(tok.path))
    chat = compile_chat_template(trl_template, tok.special_map, tok.eos)
    trajs = [make_trajectory(i, turns=1 + i % 4) for i in range(24)]
    rows = tokenize_batch([render_chat(t, MaskPolicy(), chat) for t in trajs], tok, None, Stats())
    newline_only = 0
    for t, row in zip(trajs, rows, strict=True):
        assert row is not None
        res = hf.apply_chat_template(
            chat_messages(t),
            tools=[x.openai_schema() for x in t.tools],
            chat_template=trl_template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids = np.asarray(res["input_ids"])
        assert np.array_equal(ids, row["input_ids"])
        theirs = np.asarray(res["assistant_masks"]).astype(bool)
        ours = row["labels"] != -100
        diff = np.flatnonzero(theirs != ours)
        for p in diff:  # the only allowed difference: TRL trains "\n" right after <|im_end|>, tracegen does not
            assert theirs[p] and not ours[p] and ids[p - 1] == tok.eos_id and tok.decode([ids[p]]) == "\n"
        newline_only += len(diff)
    assert newline_only > 0


def test_truncation_never_cuts_a_tool_call_and_drops_cut_answers(tiny_tokenizer: Path) -> None:
    tok = load_tokenizer(str(tiny_tokenizer))
    chat = compile_chat_template(tok.chat_template or "", tok.special_map, tok.eos)
    stats = Stats()
    with_answer = render_chat(make_trajectory(1, turns=4), MaskPolicy(), chat)
    unfinished = render_chat(make_trajectory(2, turns=4, answer=False), MaskPolicy(), chat)
    full = tokenize_batch([unfinished], tok, None, Stats())[0]
    assert full is not None
    limit = len(full["input_ids"]) // 2
    out = tokenize_batch([with_answer, unfinished], tok, limit, stats)
    assert out[0] is None and stats.dropped_too_long == 1
    cut = out[1]
    assert cut is not None and stats.truncated == 1 and len(cut["input_ids"]) <= limit
    assert tok.decode(cut["input_ids"]) == cut["text"]
    assert cut["text"].count("<tool_call>") == cut["text"].count("</tool_call>")
    assert cut["spans"][-1].end == len(cut["text"])


def test_dataset_folder_loads_and_card_is_honest(tiny_tokenizer: Path, tmp_path: Path) -> None:
    import datasets

    src = tmp_path / "kept.jsonl"
    write_trajectories(str(src), 8, source="mixed")
    (tmp_path / "report.json").write_text(json.dumps({"kept": 8, "rejected": 4, "acceptance_rate": 0.667}))
    out = tmp_path / "ds"
    r = tracegen(
        "format",
        str(src),
        "--out",
        str(out),
        "--template",
        "chat",
        "--tokenizer",
        str(tiny_tokenizer),
        "--export",
        "sharegpt",
    )
    assert r.returncode == 0, r.stderr
    assert "8 samples" in r.stdout
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == 8 and {"input_ids", "labels", "proof_mask", "spans", "messages", "tools"} <= set(ds.column_names)
    call = ds[0]["messages"][2]["tool_calls"][0]
    assert (
        isinstance(ds[0]["tools"], str)
        and call["type"] == "function"
        and isinstance(call["function"]["arguments"], str)
    )
    meta = json.loads((out / "tracegen.json").read_text())
    assert meta["tokenizer"]["vocab_hash"] == load_tokenizer(str(tiny_tokenizer)).vocab_hash
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "\nlicense: other\n" in card and "configs:" in card
    assert "data/train-*.parquet" in card
    obs = meta["provenance"]["observations"]
    assert obs["executed"] > 0 and obs["simulated"] > 0
    assert f"{obs['executed']} executed" in card and f"{obs['simulated']} simulated" in card
    assert "acceptance_rate=0.667" in card and "teacher-m" in card and "SFTTrainer" in card
    sg = datasets.load_dataset(str(out), "sharegpt", split="train", cache_dir=str(tmp_path / "hf-cache"))
    roles = [c["from"] for c in sg[0]["conversations"]]
    assert roles[0] == "human" and "function_call" in roles and "observation" in roles and roles[-1] == "gpt"
    from tracegen.distill.data import dataset_vocab_hash

    assert dataset_vocab_hash(out) == meta["tokenizer"]["vocab_hash"]


def test_bad_input_line_is_exit_2_with_file_line_and_writes_nothing(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 2)
    with src.open("a") as f:
        f.write('{"id": "broken"}\n')
    out = tmp_path / "ds"
    r = tracegen("format", str(src), "--out", str(out), "--tokenizer", str(tiny_tokenizer))
    assert r.returncode == 2 and f"{src}:3:" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]


def test_dualmind_needs_a_critique_source(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 3, judge_reason="Step 2 is justified; the answer checks out.")
    r = tracegen(
        "format", str(src), "--out", str(tmp_path / "d"), "--template", "dualmind", "--tokenizer", str(tiny_tokenizer)
    )
    assert r.returncode == 2 and "--examine teacher" in r.stderr
    cfg = FormatConfig(template="dualmind", tokenizer=str(tiny_tokenizer), examine="judge")
    format_dataset(src, tmp_path / "d", cfg)
    row = read_rows(tmp_path / "d").to_pylist()[0]
    assert "<examine>\nStep 2 is justified; the answer checks out.\n</examine>" in row["text"]
    assert any(s["kind"] == "critique" and s["train"] for s in row["spans"])


def test_examine_teacher_asks_the_teacher(tiny_tokenizer: Path, tmp_path: Path, fake_server) -> None:  # type: ignore[no-untyped-def]
    from tracegen.testing.fake_server import Scripted, text_reply

    server = fake_server(Scripted([], default=text_reply("The derivation is sound.")))
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 2)
    cfg = FormatConfig.model_validate(
        {
            "template": "dualmind",
            "tokenizer": str(tiny_tokenizer),
            "examine": "teacher",
            "teacher": {"base_url": server.base_url, "model": "critic"},
        }
    )
    format_dataset(src, tmp_path / "d", cfg)
    rows = read_rows(tmp_path / "d").to_pylist()
    assert all(r["critique"] == "The derivation is sound." for r in rows)
    assert len(server.requests) == 2


def test_import_cot_dataset(tiny_tokenizer: Path, tmp_path: Path) -> None:
    src = tmp_path / "cot.jsonl"
    src.write_text(
        "".join(json.dumps({"problem": f"q{i}", "cot": f"think {i}", "ans": f"a{i}"}) + "\n" for i in range(3))
    )
    out = tmp_path / "d"
    r = tracegen(
        "format",
        str(src),
        "--out",
        str(out),
        "--template",
        "proof",
        "--tokenizer",
        str(tiny_tokenizer),
        "--import",
        "cot",
        "--import-columns",
        "question=problem,reasoning=cot,answer=ans",
    )
    assert r.returncode == 0, r.stderr
    row = read_rows(out).to_pylist()[1]
    assert row["text"].startswith(PROOF_HEAD + "q1" + PROOF_MID + "think 1" + PROOF_TAIL + "a1")
    assert "no tool calls" in (out / "README.md").read_text()
    bad = tracegen(
        "format", str(src), "--out", str(tmp_path / "e"), "--tokenizer", str(tiny_tokenizer), "--import", "cot"
    )
    assert bad.returncode == 2 and f"{src}:1: column 'question'" in bad.stderr


def test_sharegpt_row_shape() -> None:
    row = sharegpt_row(make_trajectory(0, turns=3))
    assert row["conversations"][0] == {"from": "human", "value": make_trajectory(0).task.prompt}
    assert isinstance(json.loads(row["tools"]), list)


def test_missing_tokenizer_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputError):
        load_tokenizer(str(tmp_path))


def test_proof_without_a_derivation_has_no_empty_proof_block(tiny_tokenizer: Path, tmp_path: Path) -> None:
    bare = make_trajectory(1, turns=1)  # no tool calls; its only reasoning removed below
    last = bare.messages[-1]
    assert isinstance(last, AssistantMessage)
    bare.messages[-1] = last.model_copy(update={"reasoning": None})
    src = tmp_path / "t.jsonl"
    src.write_text(bare.model_dump_json() + "\n" + make_trajectory(2).model_dump_json() + "\n")
    result = format_dataset(src, tmp_path / "ds", FormatConfig(template="proof", tokenizer=str(tiny_tokenizer)))
    assert result.stats.samples == 2
    bare_row, full_row = read_rows(tmp_path / "ds").to_pylist()
    assert "Proof:" not in bare_row["text"] and "\n\nFinal Answer:\nThe answer is 3." in bare_row["text"]
    assert "\n\nProof:\n" in full_row["text"]
