"""Peak tensor bytes allocated on the CPU over a stretch of code, from torch profiler memory events."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class AllocPeak:
    """Peak tensor bytes allocated on the CPU between ``start()`` and ``stop()``, above the level at ``start()``."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    def start(self) -> None:
        self.prof.start()

    def stop(self) -> int:
        self.prof.stop()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trace.json"
            self.prof.export_chrome_trace(str(path))
            events: list[dict[str, Any]] = json.loads(path.read_text())["traceEvents"]
        mem = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
        if not mem:
            return 0
        base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
        return int(max(m["Total Allocated"] for m in mem) - base)


def peak_alloc(fn: Callable[[], object]) -> int:
    """Peak bytes ``fn()`` allocates (beyond what was allocated when it started)."""
    peak = AllocPeak()
    peak.start()
    fn()
    return peak.stop()
