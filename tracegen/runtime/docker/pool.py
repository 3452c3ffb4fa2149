"""The warm pool of sandbox containers over one or more engines: start, hand out, reset, remove."""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from tracegen.errors import RuntimeToolError
from tracegen.records import RuntimeInfo
from tracegen.runtime.docker.channel import WorkerChannel, WorkerLost
from tracegen.runtime.docker.episode import DockerEpisode
from tracegen.runtime.docker.settings import (
    LABEL_CREATED,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_RUN,
    LABEL_TTL,
    SANDBOX_ENV,
    VERIFIED_FRESH_S,
    WORKER_CAPABILITIES,
    WORKER_PATH,
    WORKER_USER,
    WORKER_VERSION,
    DockerRuntimeConfig,
)
from tracegen.runtime.docker.sweep import connect, owner_label, short_error, sweep_engine

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False)
class Engine:
    url: str | None
    client: docker.DockerClient
    capacity: int
    live: int = 0
    """Containers of this runtime on the engine: starting, idle in the pool, or in use."""

    @property
    def free(self) -> float:
        return (self.capacity - self.live) / self.capacity


@dataclass(eq=False)
class Sandbox:
    engine: Engine
    container_id: str
    channel: WorkerChannel
    created: float = field(default_factory=time.monotonic)
    worker_pid: int = 0
    """The worker's pid inside the container."""
    dead: bool = False
    """Killed or lost: the trajectory's next call needs a fresh container."""
    tainted: bool = False
    """A call timed out or was OOM-killed here: replace it rather than reset it."""
    uses: int = 0
    """Trajectories this container has served (recycling)."""
    verified_at: float = float("-inf")
    """When its last reset was verified (monotonic seconds)."""
    released: bool = False
    """Handed back: its engine slot is free and its removal is under way."""


class DockerRuntime:
    """A warm pool of hardened containers, one per trajectory, over one or more Docker engines."""

    def __init__(self, config: DockerRuntimeConfig | None = None, *, max_chars: int | None = None) -> None:
        self.config = config or DockerRuntimeConfig()
        self.max_chars = max_chars or self.config.max_chars
        self.run_id = uuid.uuid4().hex[:12]
        self.engines: list[Engine] = []
        self._executor = ThreadPoolExecutor(self.config.api_threads, thread_name_prefix="tracegen-docker")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: collections.deque[Sandbox] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Sandbox]] = collections.deque()
        self._in_use: set[Sandbox] = set()
        self._starting = 0
        self._failures = 0
        self._wake = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._fill_tasks: set[asyncio.Task[None]] = set()
        self._removals: set[asyncio.Task[None]] = set()
        self._resetting: set[Sandbox] = set()
        self._recycles: set[asyncio.Future[None]] = set()
        self.reset_seconds: collections.deque[float] = collections.deque(maxlen=100_000)
        """Duration of each verified reset, as the worker measured it (for benchmarks)."""
        self._closed = False
        self._counter = 0
        self._atexit_registered = False

    # -- protocol ---------------------------------------------------------------------------

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(kind="docker", image=self.config.image)

    async def start(self) -> None:
        """Connect every engine, check the image, sweep leftovers, start the first container."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        urls: list[str | None] = list(self.config.engines) or [None]
        clients = await asyncio.gather(*(self._api(connect, url, self.config.api_threads) for url in urls))
        for url, client in zip(urls, clients, strict=True):
            capacity = self.config.max_containers_per_engine
            if capacity is None:
                capacity = await self._api(self._capacity, client)
            self.engines.append(Engine(url, client, capacity))
            await self._api(self._check_image, client, url)
            swept = await self._api(sweep_engine, client)
            if swept.removed:
                log.info("removed %d leftover tracegen container(s) from %s", swept.removed, url or "the engine")
        # Crash safety: a normal interpreter exit removes this run's containers even without aclose().
        atexit.register(self._remove_all_sync)
        self._atexit_registered = True
        # The first container is made here, so a bad setting fails the run now, not per trajectory.
        first = await self._start_sandbox(self._pick_engine() or self.engines[0])
        self._ready.append(first)
        self._filler = asyncio.create_task(self._fill())
        if self.config.prefill:
            target = min(self.config.pool_size, sum(e.capacity for e in self.engines))
            while len(self._ready) < target and self._failures < 3:
                await asyncio.sleep(0.05)  # the filler starts them, max_starting at a time

    async def open_episode(self, trajectory_id: str) -> DockerEpisode:
        return DockerEpisode(self, trajectory_id)

    async def aclose(self) -> None:
        """Remove every container of this run, on every engine. Never raises."""
        if self._closed:
            return
        self._closed = True
        tasks: list[asyncio.Future[Any]] = [
            *self._fill_tasks,
            *self._recycles,
            *([self._filler] if self._filler else []),
        ]
        for task in tasks:
            task.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(RuntimeToolError("the Docker runtime is shutting down"))
        self._waiters.clear()
        for sandbox in [*self._ready, *self._in_use, *self._resetting]:
            sandbox.channel.close()
        self._ready.clear()
        self._in_use.clear()
        self._resetting.clear()
        await asyncio.gather(*tasks, *self._removals, return_exceptions=True)
        # Let docker-py calls already running finish, so no container gets created after the sweep.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._remove_all_sync)
        for engine in self.engines:
            with contextlib.suppress(Exception):
                engine.client.close()
        if self._atexit_registered:
            atexit.unregister(self._remove_all_sync)
            self._atexit_registered = False

    # -- docker-py through the bounded pool ---------------------------------------------------

    async def _api(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking docker-py call on the bounded thread pool; engine failures become RuntimeToolError."""
        return await self._result_of(self._executor.submit(fn, *args, **kwargs))

    async def _api_resource(self, fn: Callable[..., T], *args: Any, close: Callable[[T], Any]) -> T:
        """``_api`` for a call that returns something to close (a socket).

        A caller cancelled while the call runs (aclose() cancels the pool's fill tasks) would drop
        the result unclosed, to be found by the garbage collector; ``close`` gets it instead.
        """
        call = self._executor.submit(fn, *args)
        try:
            return await self._result_of(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: _close_result(done, close))
            raise

    @staticmethod
    async def _result_of(call: Future[T]) -> T:
        import docker.errors
        import requests.exceptions

        try:
            return await asyncio.wrap_future(call)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise RuntimeToolError(f"Docker engine call failed: {short_error(exc)}") from exc

    def _capacity(self, client: docker.DockerClient) -> int:
        from docker.utils import parse_bytes

        total = int(client.info().get("MemTotal") or 0)
        return max(1, total // max(1, int(parse_bytes(self.config.mem_limit))))

    def _check_image(self, client: docker.DockerClient, url: str | None) -> None:
        import docker.errors

        try:
            client.api.inspect_image(self.config.image)
        except docker.errors.ImageNotFound as exc:
            raise RuntimeToolError(
                f"sandbox image {self.config.image!r} is not on {url or 'the Docker engine'}",
                hint="build it with `tracegen sandbox build` (or set collect.docker.image)",
            ) from exc

    # -- containers --------------------------------------------------------------------------

    def _container_spec(self) -> tuple[dict[str, str], dict[str, Any]]:
        from docker.types import LogConfig, Ulimit
        from docker.utils import parse_bytes

        c = self.config
        labels = {
            **c.labels,
            LABEL_MANAGED: "tracegen",
            LABEL_RUN: self.run_id,
            LABEL_OWNER: owner_label(),
            LABEL_CREATED: str(int(time.time())),
            LABEL_TTL: str(c.ttl_s),
        }
        mem = parse_bytes(c.mem_limit)
        host: dict[str, Any] = {
            "auto_remove": True,
            "init": True,
            "network_mode": c.network_mode,
            "read_only": c.read_only,
            "tmpfs": dict(c.tmpfs),
            "pids_limit": c.pids_limit,
            "mem_limit": mem,
            "memswap_limit": mem,
            "nano_cpus": int(c.cpus * 1e9),
            "ulimits": [
                Ulimit(name="nofile", soft=c.nofile, hard=c.nofile),
                Ulimit(name="fsize", soft=c.fsize_bytes, hard=c.fsize_bytes),
            ],
            # No container log on the host: nothing inside can grow the host's disk through it.
            "log_config": LogConfig(type=LogConfig.types.NONE),
        }
        if c.drop_capabilities:
            host["cap_drop"] = ["ALL"]
            host["cap_add"] = list(WORKER_CAPABILITIES)
        if c.no_new_privileges:
            host["security_opt"] = ["no-new-privileges"]
        if c.docker_runtime:
            host["runtime"] = c.docker_runtime
        return labels, host

    def _create_container(self, engine: Engine, name: str) -> str:
        labels, host = self._container_spec()
        api = engine.client.api
        container = api.create_container(
            self.config.image,
            command=["sleep", str(self.config.ttl_s)],
            name=name,
            user=WORKER_USER,
            working_dir=self.config.work_dir,
            environment=SANDBOX_ENV,
            labels=labels,
            host_config=api.create_host_config(**host),
        )
        cid: str = container["Id"]
        try:
            api.start(cid)
        except Exception:
            with contextlib.suppress(Exception):
                api.remove_container(cid, force=True)
            raise
        return cid

    def _attach_worker(self, engine: Engine, cid: str) -> Any:
        api = engine.client.api
        uid, gid = self.config.uid_gid()
        exec_id = api.exec_create(
            cid,
            [*self.config.worker_command, "--uid", str(uid), "--gid", str(gid)],
            stdin=True,
            stdout=True,
            stderr=True,
            user=WORKER_USER,
            workdir=self.config.work_dir,
            environment=SANDBOX_ENV,
        )["Id"]
        sock = api.exec_start(exec_id, socket=True)
        inner = getattr(sock, "_sock", None)
        if type(inner) is not socket.socket:
            return inner if inner is not None else sock  # TLS, ssh: driven by a thread (see WorkerChannel)
        # Own a duplicate of the connection, then drop docker-py's wrappers: the HTTP response keeps
        # a reference that would otherwise keep the original descriptor open after we close it.
        own = inner.dup()
        sock.close()
        inner.close()
        return own

    async def _start_sandbox(self, engine: Engine) -> Sandbox:
        """Create, start and attach one container; its worker has said hello when this returns."""
        self._counter += 1
        name = f"tracegen-{self.run_id}-{self._counter}"
        engine.live += 1
        cid: str | None = None
        channel: WorkerChannel | None = None
        try:
            cid = await self._api(self._create_container, engine, name)
            raw = await self._api_resource(self._attach_worker, engine, cid, close=_close_quietly)
            assert self._loop is not None
            channel = WorkerChannel(raw, self._loop, self.config.max_reply_bytes())
            await channel.start()
            try:
                hello = await channel.request({"op": "hello"}, self.config.start_timeout_s)
            except (WorkerLost, TimeoutError) as exc:
                raise RuntimeToolError(
                    f"the sandbox worker did not start in {self.config.image!r}: {channel.stderr_tail() or exc}",
                    hint=f"the image needs python3 and the worker at {WORKER_PATH}: "
                    "build it with `tracegen sandbox build`",
                ) from exc
            if hello.get("op") != "hello" or hello.get("version") != WORKER_VERSION:
                raise RuntimeToolError(
                    f"the sandbox worker in {self.config.image!r} speaks protocol {hello.get('version')!r}, "
                    f"not {WORKER_VERSION}",
                    hint="rebuild the image with `tracegen sandbox build`",
                )
            return Sandbox(engine, cid, channel, worker_pid=int(hello.get("pid") or 0))
        except BaseException:  # cancellation included: nothing half-made may linger
            engine.live -= 1
            if channel is not None:
                channel.close()
            if cid is not None:
                self._remove_later(engine, cid)
            raise

    def _remove_later(self, engine: Engine, cid: str) -> None:
        if self._closed:
            return  # aclose() sweeps every container of the run at once
        import docker.errors

        def remove() -> None:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                engine.client.api.remove_container(cid, force=True)

        task = asyncio.ensure_future(self._api(remove))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    def _discard(self, sandbox: Sandbox) -> None:
        """Close and remove one container (in the background); frees its engine slot. Idempotent."""
        self._in_use.discard(sandbox)
        sandbox.dead = True
        if sandbox.released:
            return
        sandbox.released = True
        sandbox.channel.close()
        sandbox.engine.live -= 1
        self._remove_later(sandbox.engine, sandbox.container_id)
        self._wake.set()

    def _remove_all_sync(self) -> None:
        """atexit backstop: remove this run's containers when aclose() never ran."""
        for engine in self.engines:
            with contextlib.suppress(Exception):
                sweep_engine(engine.client, only_stale=False, run_id=self.run_id)

    def _pick_engine(self) -> Engine | None:
        """The engine with the most free capacity (as a fraction), or None when all are full."""
        candidates = [e for e in self.engines if e.live < e.capacity]
        return max(candidates, key=lambda e: e.free) if candidates else None

    async def _fill(self) -> None:
        """Keep ``pool_size`` idle containers plus one per waiting trajectory, ``max_starting`` at a time.

        With recycling, containers in use count too: they return to the pool after their reset.
        """
        while not self._closed:
            coming = self._starting + len(self._resetting)  # containers about to be ready
            want = self.config.pool_size + len(self._waiters) - len(self._ready) - coming
            if self.config.recycle:
                # Containers in use come back after their reset: pool_size counts them, and only the
                # waiters that no starting or resetting container will serve need a new one.
                warm = len(self._ready) + len(self._in_use) + coming
                want = max(len(self._waiters) - coming, self.config.pool_size - warm)
            engine = self._pick_engine()
            if want <= 0 or self._starting >= self.config.max_starting or engine is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._starting += 1
            task = asyncio.create_task(self._fill_one(engine))
            self._fill_tasks.add(task)
            task.add_done_callback(self._fill_tasks.discard)

    async def _fill_one(self, engine: Engine) -> None:
        try:
            sandbox = await self._start_sandbox(engine)
        except Exception as exc:  # noqa: BLE001  # a background task must report, never die silently
            error = exc if isinstance(exc, RuntimeToolError) else RuntimeToolError(f"sandbox start: {short_error(exc)}")
            self._failures += 1
            log.warning("starting a sandbox container failed (%d in a row): %s", self._failures, error.message)
            if self._failures >= 3 and self._waiters:
                # Persistent failure: fail a waiting trajectory rather than let it hang.
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(error)
            await asyncio.sleep(min(10.0, 0.2 * 2**self._failures))
            return
        finally:
            self._starting -= 1
            self._wake.set()
        self._failures = 0
        self._hand_out(sandbox)

    def _hand_out(self, sandbox: Sandbox) -> None:
        """A healthy container (new, or reset) goes to the first waiting trajectory, else the pool."""
        if self._closed:
            self._discard(sandbox)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_use.add(sandbox)
                waiter.set_result(sandbox)
                return
        self._ready.append(sandbox)

    async def acquire(self) -> Sandbox:
        """A fresh, healthy container for one trajectory (waits for the pool when it is empty)."""
        if self._closed or self._loop is None:
            raise RuntimeToolError("the Docker runtime is not running", hint="call start() first")
        while True:
            if self._ready:
                sandbox = self._ready.popleft()
                self._in_use.add(sandbox)
                self._wake.set()
            else:
                waiter: asyncio.Future[Sandbox] = self._loop.create_future()
                self._waiters.append(waiter)
                self._wake.set()
                try:
                    sandbox = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                        self._discard(waiter.result())
                    raise
            # Health check before hand-out: a container may have died while idle (ttl, OOM, kill). A
            # reset verified moments ago is that check already (nothing of the sandbox user runs since).
            if sandbox.verified_at > time.monotonic() - VERIFIED_FRESH_S and not sandbox.channel.lost:
                sandbox.uses += 1
                return sandbox
            try:
                pong = await sandbox.channel.request({"op": "ping"}, self.config.start_timeout_s)
                if pong.get("op") == "pong":
                    sandbox.uses += 1
                    return sandbox
            except (WorkerLost, TimeoutError):
                pass
            log.info("discarding a dead sandbox container %s", sandbox.container_id[:12])
            self._discard(sandbox)

    def release(self, sandbox: Sandbox) -> None:
        """A trajectory is done with its container: reset for the next one when it may be, else removed."""
        c = self.config
        if (
            not c.recycle
            or self._closed
            or sandbox.dead
            or sandbox.tainted
            or sandbox.channel.lost
            or sandbox.uses >= c.recycle_max_uses
        ):
            self._discard(sandbox)
            return
        self._in_use.discard(sandbox)
        self._resetting.add(sandbox)
        task = asyncio.ensure_future(self._recycle(sandbox))
        self._recycles.add(task)
        task.add_done_callback(self._recycles.discard)

    async def _recycle(self, sandbox: Sandbox) -> None:
        """Reset a used container and verify it; a reset that fails or is not verified replaces it."""
        ok = False
        try:
            reply = await sandbox.channel.request(
                {"op": "reset", "mounts": self.config.reset_mounts()}, self.config.reset_timeout_s
            )
            ok = reply.get("op") == "reset" and reply.get("ok") is True
            if ok:
                self.reset_seconds.append(float(reply.get("duration_s") or 0.0))
                sandbox.verified_at = time.monotonic()
            else:
                problems = "; ".join(str(p) for p in reply.get("problems") or [reply.get("error")])
                log.warning("sandbox %s failed its reset, replacing it: %s", sandbox.container_id[:12], problems[:500])
        except (WorkerLost, TimeoutError) as exc:
            log.warning("sandbox %s did not reset, replacing it: %s", sandbox.container_id[:12], exc or "timed out")
        finally:
            self._resetting.discard(sandbox)
        if ok:
            self._hand_out(sandbox)
        else:
            self._discard(sandbox)
        self._wake.set()

    async def kill(self, sandbox: Sandbox) -> None:
        """Kill a container whose worker stopped answering (the host-side deadline)."""
        import docker.errors

        sandbox.dead = True
        sandbox.channel.close()
        with contextlib.suppress(RuntimeToolError, docker.errors.NotFound, docker.errors.APIError):
            await self._api(sandbox.engine.client.api.kill, sandbox.container_id)

    async def was_oom_killed(self, sandbox: Sandbox) -> bool:
        """The container's own record of an OOM kill (docker sets it on any OOM kill inside)."""
        try:
            state = await self._api(sandbox.engine.client.api.inspect_container, sandbox.container_id)
        except RuntimeToolError:
            return False
        return bool(state.get("State", {}).get("OOMKilled"))


def _close_result(call: Future[T], close: Callable[[T], Any]) -> None:
    if not call.cancelled() and call.exception() is None:
        close(call.result())


def _close_quietly(resource: Any) -> None:
    with contextlib.suppress(OSError):
        resource.close()
