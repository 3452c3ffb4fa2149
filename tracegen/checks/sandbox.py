"""The Docker runtime that the sandbox checks (tests, replay) share, started on first need.

A filter run whose sandbox verdicts all come from the journal never starts a container.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from tracegen.runtime.docker.settings import DockerRuntimeConfig

if TYPE_CHECKING:
    from tracegen.runtime.docker.pool import DockerRuntime


class SharedSandbox:
    def __init__(self, config: DockerRuntimeConfig) -> None:
        self.config = config
        self._runtime: DockerRuntime | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> DockerRuntime:
        async with self._lock:
            if self._runtime is None:
                from tracegen.runtime.docker.pool import DockerRuntime

                runtime = DockerRuntime(self.config)
                self._runtime = runtime
                await runtime.start()
            return self._runtime

    async def aclose(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await runtime.aclose()
