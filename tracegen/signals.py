"""Signal handling shared by the long-running stages (collect, filter)."""

from __future__ import annotations

import asyncio
import contextlib
import signal


def cancel_on_sigterm() -> None:
    """SIGTERM behaves like Ctrl-C: cancel the running task so its clean-up runs (containers, files)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:
        # Not the main thread, or no signal support: Ctrl-C still works.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
