"""`tracegen serve MODEL`: a local teacher from the command line, aliases included."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest

from .conftest import start_tracegen


@pytest.mark.slow
def test_serve_an_alias_prints_the_collect_flags_and_answers_until_ctrl_c() -> None:
    proc = start_tracegen("serve", "tiny:smollm2", "--port", "0")
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(6)]
        base_url = lines[0].split()[-1]
        model = lines[1].split(maxsplit=1)[-1].strip()
        assert base_url.startswith("http://127.0.0.1:") and lines[2].strip() == "tool protocol: hermes"
        assert f"--teacher-base-url {base_url} --teacher-model {model} --tool-protocol hermes" in lines[4]
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        request = urllib.request.Request(
            f"{base_url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert json.loads(response.read())["choices"][0]["message"]["content"] is not None
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err
