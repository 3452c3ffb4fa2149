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
