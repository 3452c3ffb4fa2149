"""The Docker runtime: every tool call runs for real, in a hardened container of its own trajectory.

How a call runs. A warm pool keeps containers started ahead of need (first process ``sleep <ttl>``
under ``init``, auto-removed when it exits), each with the sandbox worker (``sandbox/worker.py``)
already attached over one ``docker exec`` stream that speaks JSON lines. A trajectory takes a
container on its first tool call and keeps it until it ends, so files written by one call are
there for the next. A call is one JSON line each way: a few milliseconds, against tens for a
``docker exec`` and hundreds for a ``docker run``; ``python`` calls fork from the worker's warm
interpreter instead of starting ``python3``.

Two users. The worker and PID 1 run as root with only SETUID, SETGID and KILL; every command runs
as ``user`` (1000:1000), no capabilities, no supplementary groups. So tool code cannot open the
worker's streams through ``/proc``, trace it, signal it, or write to PID 1's output: what the host
reads is written by the worker alone. The host still trusts nothing it reads: each reply must echo
its request's id and a random nonce, a line must fit ``max_reply_bytes()``, and a line nobody asked
for ends the channel; any of these is a protocol error that replaces the container. Containers log
nothing on the host (log driver ``none``).

Deadlines, in three layers: the worker SIGKILLs every process of the sandbox user at
``timeout_s``; the host waits ``kill_grace_s`` more for the reply; past that it kills the container
and the trajectory's next call gets a fresh one. Output is capped twice: the worker keeps at most
``keep_bytes`` of each stream (head and tail) and kills a command that writes more than
``kill_bytes``; the model then sees at most ``max_chars`` characters, middle-truncated.

Recycling (``recycle``, on by default). When a trajectory ends, its container is reset and handed
to a later trajectory instead of being replaced, up to ``recycle_max_uses`` times. The reset kills
every process of the sandbox user, empties every mount it can write to (``tmpfs`` work dirs,
``/dev/shm``, ``/dev/mqueue``) and restores their modes, removes its System V IPC objects, then
verifies each of those (no process of the uid, each mount empty at its mode, no IPC object, the
worker answering) before the container goes back to the pool; a reset that fails or is not verified
in ``reset_timeout_s`` replaces the container, and so does a container whose call timed out or
was OOM-killed. Against a fresh container, a recycled one differs only in what the sandbox user
cannot reset and the next trajectory can at most observe: the pid counter and process start times,
the container's uptime and cgroup counters (CPU time, OOM-kill count, memory high-water mark),
the kernel's shared state (page cache, entropy, network namespace counters on loopback). The
read-only root filesystem means nothing else can carry a file from one trajectory to the next; the
``writable places`` self-check asserts that every writable path is a mount that the reset empties.
With ``recycle: false`` every trajectory gets a fresh container, as before.

What the sandbox protects against (all on by default, each configurable):

- code that loops forever, forks without end, leaves background processes, fills memory or disk,
  or prints without end: deadlines, ``pids_limit``, ``mem_limit`` (= ``memswap_limit``, so no
  swap), a CPU quota, size-limited tmpfs work dirs, ``ulimit`` on file size and open files;
- code that reaches the network: ``network_mode=none`` (loopback only);
- code that changes the image or the host: read-only root filesystem, a non-root user, every
  capability dropped, ``no-new-privileges``;
- code that forges what the host reads (a tool result, a tests verdict) or grows the host's
  memory or disk: separate uids for worker and commands, replies matched by id and nonce,
  bounded host buffers, no container log;
- the host's secrets: containers get a fixed, minimal environment, never the host's (so
  ``TRACEGEN_TEACHER_API_KEY`` is not there) and no host directory is mounted;
- trajectories seeing each other: one trajectory per container at a time, a verified reset
  between two (above);
- leaked containers: every container is labelled with its owner process and a ttl; start-up sweeps
  those whose owner is dead or whose ttl passed (never one whose owner lives, whatever its state),
  exit removes our own, and ``sleep <ttl>`` ends the container even after ``kill -9`` of the host
  process.

What it does not protect against:

- kernel or container-runtime exploits: containers share the host kernel. For hostile code from
  untrusted parties use a VM boundary (gVisor's ``runsc`` via ``docker_runtime``, Kata, Firecracker);
- anything an engine you point it at allows: a remote ``DOCKER_HOST`` is trusted like a local one;
- exhaustion of shared resources the limits do not cover (disk I/O bandwidth, the page cache,
  the engine's own throughput);
- code inside one trajectory harming that trajectory (deleting its own files, exiting early);
- a solution under ``filter --verifier tests`` that ends its own test process with exit 0 (e.g.
  ``sys.exit(0)`` on import): the tests run in the solution's process, so their exit code is
  the verdict; the worker reports it faithfully, it cannot tell who chose it;
- processes outliving a call: every process a call started is killed when the call ends. Files
  persist across the calls of a trajectory; processes do not.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tracegen.errors import RuntimeToolError
from tracegen.runtime.base import ToolOutput
from tracegen.truncate import middle_truncate
from tracegen.types import Observation, RuntimeInfo, ToolCall, ToolSpec

if TYPE_CHECKING:
    import docker

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_MANAGED = "tracegen.managed-by"
LABEL_RUN = "tracegen.run-id"
LABEL_OWNER = "tracegen.owner"
LABEL_CREATED = "tracegen.created"
LABEL_TTL = "tracegen.ttl"
MANAGED_FILTER = {"label": f"{LABEL_MANAGED}=tracegen"}

DEFAULT_IMAGE = "tracegen-sandbox:latest"
WORKER_PATH = "/opt/tracegen/worker.py"
WORKER_VERSION = 2
# The worker and PID 1 run as root with only these: start each command as the sandbox user, and
# kill what it leaves. Commands run as another uid, with none.
WORKER_USER = "0:0"
WORKER_CAPABILITIES = ("SETUID", "SETGID", "KILL")
VERIFIED_FRESH_S = 5.0  # a container reset and verified this recently is handed out without a ping
RESTART_NOTE = "[note: the sandbox was restarted before this call; files from earlier calls are gone]\n"
# Fixed container environment: never derived from the host's, so no host secret can reach it.
SANDBOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
}


class DockerRuntimeConfig(BaseModel):
    """Settings of the Docker sandbox runtime (recipe section ``collect.docker``)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(DEFAULT_IMAGE, description="Sandbox image; needs python3, bash and the tracegen worker.")
    engines: list[str] = Field(
        default_factory=list,
        description="Docker engines to spread containers over (unix://, tcp://, ssh:// URLs); "
        "empty means the one DOCKER_HOST (or the default socket) names.",
    )
    max_containers_per_engine: int | None = Field(
        None, ge=1, description="Containers per engine at once; default: engine memory / mem_limit."
    )
    pool_size: int = Field(
        8,
        ge=0,
        description="Containers kept started ahead of need: idle ones, plus (with recycle) those in use, "
        "which come back after their reset.",
    )
    prefill: bool = Field(
        False, description="Wait at start-up until pool_size containers are ready, so the first wave never waits."
    )
    max_starting: int = Field(2, ge=1, description="Containers being created at once (bounds the creation rate).")
    api_threads: int = Field(
        16, ge=1, description="Threads for docker-py calls; each engine client's connection pool has this size."
    )
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one tool call; its processes are killed at it.")
    kill_grace_s: float = Field(
        5.0, gt=0, description="Extra wait for the worker's reply before the host kills the container."
    )
    start_timeout_s: float = Field(30.0, gt=0, description="Longest wait for a new container's worker to answer.")
    ttl_s: int = Field(
        6 * 3600, ge=60, description="Container lifetime (its first process is `sleep ttl`); sweeps remove older ones."
    )
    max_chars: int = Field(8000, ge=64, description="Longest output the model sees; longer is middle-truncated.")
    keep_bytes: int = Field(
        256 * 1024, ge=1024, description="Bytes of each stream read back per call (head and tail halves)."
    )
    kill_bytes: int = Field(
        256 * 1024 * 1024, ge=1024, description="A command writing more than this (both streams) is killed."
    )
    python: str = Field("python3", description="Interpreter the `python` tool runs.")
    shell: str = Field("bash", description="Shell the `bash` tool runs.")
    worker_command: list[str] = Field(
        default_factory=lambda: ["python3", WORKER_PATH], description="How to start the worker in the container."
    )
    user: str = Field(
        "1000:1000",
        description="uid:gid every command runs as (never root). The worker and the container's first "
        "process run as root with only the SETUID, SETGID and KILL capabilities, so no command can reach them.",
    )
    work_dir: str = Field("/work", description="Working directory of every call (a tmpfs).")
    tmpfs: dict[str, str] = Field(
        default_factory=lambda: {
            "/work": "rw,exec,nosuid,nodev,size=512m,uid=1000,gid=1000,mode=0755",
            "/tmp": "rw,exec,nosuid,nodev,size=256m,uid=1000,gid=1000,mode=1777",
        },
        description="Size-limited tmpfs mounts (tmpfs defaults to noexec: `exec` lets compiled programs run).",
    )
    network_mode: str = Field("none", description="Container network; `none` leaves only loopback.")
    read_only: bool = Field(True, description="Mount the root filesystem read-only.")
    drop_capabilities: bool = Field(True, description="cap_drop=ALL.")
    no_new_privileges: bool = Field(True, description="security_opt no-new-privileges (setuid binaries gain nothing).")
    mem_limit: str = Field("1g", description="Memory limit; swap is disabled by setting memswap_limit to the same.")
    cpus: float = Field(1.0, gt=0, description="CPU quota in cores.")
    pids_limit: int = Field(256, ge=8, description="Processes and threads per container (stops fork bombs).")
    nofile: int = Field(1024, ge=64, description="Open-file ulimit.")
    fsize_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="Largest file a command may write (ulimit).")
    docker_runtime: str | None = Field(None, description="OCI runtime, e.g. `runsc` for gVisor; default: the engine's.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every container.")
    recycle: bool = Field(
        True,
        description="Hand a container to the next trajectory after a verified reset (every process of the "
        "sandbox user killed, every writable mount emptied, its IPC objects removed, all of it checked) "
        "instead of replacing it. False: a fresh container per trajectory.",
    )
    recycle_max_uses: int = Field(50, ge=1, description="Trajectories one container serves before it is replaced.")
    reset_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for a reset; past it the container is replaced."
    )
    python_zygote: bool = Field(
        True,
        description="Run `python` calls in a child forked from the worker's warm interpreter (about 1 ms "
        "instead of 10), with the same isolation per call; only when `python` is the worker's interpreter.",
    )

    @field_validator("user")
    @classmethod
    def _not_root(cls, value: str) -> str:
        uid, _, gid = value.partition(":")
        if not uid.isdigit() or not (gid or "0").isdigit():
            raise ValueError(f"user must be numeric uid:gid (e.g. 1000:1000), got {value!r}")
        if int(uid) == 0 or (gid and int(gid) == 0):
            raise ValueError("user must not be root (uid or gid 0): commands would reach the worker")
        return value

    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = self.user.partition(":")
        return int(uid), int(gid or uid)

    def reset_mounts(self) -> dict[str, int]:
        """Every place the sandbox user can write, with the mode a fresh container has there."""
        mounts = {path: _tmpfs_mode(options) for path, options in self.tmpfs.items()}
        return {**mounts, "/dev/shm": 0o1777, "/dev/mqueue": 0o1777}

    def max_reply_bytes(self) -> int:
        """Largest reply line a worker may send: two captured streams, JSON-escaped (<= 6 bytes a byte)."""
        return 2 * 6 * self.keep_bytes + (64 << 10)


def _tmpfs_mode(options: str) -> int:
    for option in options.split(","):
        key, _, value = option.partition("=")
        if key.strip() == "mode":
            return int(value, 8)
    return 0o1777  # tmpfs's own default


class SweepReport(NamedTuple):
    removed: int
    kept: int


class WorkerLost(Exception):
    """The worker's stream ended: the worker (or its container) is gone."""


# ---------------------------------------------------------------------------------------------
# Owner identity and sweeping


def _proc_start_ticks(pid: int) -> str:
    """Start time of a process in clock ticks since boot, so a reused pid is not mistaken for us."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def owner_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start_ticks(os.getpid())}"


def _owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it lives elsewhere (only its ttl can tell)."""
    host, _, rest = owner.partition(":")
    pid_text, _, ticks = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return ticks in ("", "0") or _proc_start_ticks(pid) in (ticks, "0")


def _is_stale(labels: dict[str, str], status: str, now: float) -> bool:
    """A container whose owner lives is never stale, whatever its state (it may be starting)."""
    alive = _owner_alive(labels.get(LABEL_OWNER, ""))
    if alive is not None:
        return not alive
    if status in ("exited", "dead"):
        return True
    try:
        return int(labels.get(LABEL_CREATED, "0")) + int(labels.get(LABEL_TTL, "0")) < now
    except ValueError:
        return True


def sweep_engine(client: docker.DockerClient, only_stale: bool = True, run_id: str | None = None) -> SweepReport:
    """Remove tracegen containers on one engine: stale ones, one run's, or (only_stale=False) all."""
    import docker.errors

    filters: dict[str, Any] = {"label": [f"{LABEL_MANAGED}=tracegen"]}
    if run_id is not None:
        filters["label"].append(f"{LABEL_RUN}={run_id}")
    removed = kept = 0
    now = time.time()
    for summary in client.api.containers(all=True, filters=filters):
        labels = summary.get("Labels") or {}
        if only_stale and run_id is None and not _is_stale(labels, summary.get("State", ""), now):
            kept += 1
            continue
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            # 409 "removal already in progress" (auto-remove) counts as gone.
            client.api.remove_container(summary["Id"], force=True)
        removed += 1
    return SweepReport(removed, kept)


def connect(url: str | None, threads: int = 4, timeout: float = 60.0) -> docker.DockerClient:
    """A client for one engine (``None``: from the environment); raises RuntimeToolError if it does not answer."""
    import docker
    import docker.errors
    import requests.exceptions

    where = url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    hint = "start one (as root: bash scripts/provision_docker.sh), or set collect.docker.engines"
    # Checked first: docker-py leaks a socket when its constructor's version probe cannot connect.
    if where.startswith("unix://"):
        path = where.removeprefix("unix://")
        if not Path(path).is_socket():
            raise RuntimeToolError(f"no Docker engine answers at {where}: no such socket", hint=hint)
        with socket.socket(socket.AF_UNIX) as probe:  # a socket file left by a dead daemon refuses
            try:
                probe.connect(path)
            except OSError as exc:
                raise RuntimeToolError(f"no Docker engine answers at {where}: {exc.strerror}", hint=hint) from exc
    try:
        if url is None:
            client = docker.from_env(version="auto", max_pool_size=threads, timeout=int(timeout))
        else:
            client = docker.DockerClient(
                base_url=url,
                version="auto",
                max_pool_size=threads,
                timeout=int(timeout),
                use_ssh_client=url.startswith("ssh://"),  # the system ssh honours ~/.ssh/config and agents
            )
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise RuntimeToolError(f"no Docker engine answers at {where}: {_short(exc)}", hint=hint) from exc
    return client


# ---------------------------------------------------------------------------------------------
# The worker stream


class WorkerChannel:
    """One attached exec stream to the worker: JSON lines in, docker-multiplexed JSON lines out.

    One request at a time. Every request carries a fresh ``id`` and random ``nonce``; the reply must
    echo both. Anything else (a reply to another request, a line nobody asked for, a line longer
    than ``max_line`` bytes, a frame larger than that) is a protocol violation: the channel is
    lost, so the container is replaced, and nothing of it is returned as a call's output. What the
    host holds per channel is bounded: one line of at most ``max_line`` bytes and a short stderr
    tail; input is scanned once, in time linear in the bytes received.

    Plain (unix or tcp) sockets are driven by asyncio directly; other transports (TLS, ssh) by a
    reader thread of their own, so a waiting call never holds one of the bounded API threads.
    """

    STDERR_KEEP = 4096

    def __init__(self, raw: Any, loop: asyncio.AbstractEventLoop, max_line: int = 1 << 24) -> None:
        self._raw = raw
        self._loop = loop
        self.max_line = max_line
        self._pending: asyncio.Future[dict[str, Any]] | None = None
        self._buffer = bytearray()
        self._line = bytearray()
        self._stderr: collections.deque[bytes] = collections.deque(maxlen=8)
        self._sent = 0
        self.lost = False
        self.violation: str | None = None
        """Why the channel was declared lost by the host (a protocol violation), if it was."""
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        if type(self._raw) is socket.socket:
            self._raw.setblocking(False)
            if self._raw.family == socket.AF_UNIX:
                reader, self._writer = await asyncio.open_unix_connection(sock=self._raw, limit=1 << 16)
            else:
                reader, self._writer = await asyncio.open_connection(sock=self._raw, limit=1 << 16)
            self._reader_task = asyncio.create_task(self._pump_async(reader))
        else:
            self._thread = threading.Thread(target=self._pump_thread, name="tracegen-worker-stream", daemon=True)
            self._thread.start()

    async def _pump_async(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while not self.lost and (data := await reader.read(1 << 16)):
                self._feed(data)
        self._feed_eof()

    def _pump_thread(self) -> None:
        recv = getattr(self._raw, "recv", None) or self._raw.read
        with contextlib.suppress(OSError, ValueError, EOFError):
            while not self.lost and (data := recv(1 << 16)):
                self._loop.call_soon_threadsafe(self._feed, data)
        with contextlib.suppress(RuntimeError):  # the loop may be closed already
            self._loop.call_soon_threadsafe(self._feed_eof)

    def _feed(self, data: bytes) -> None:
        if self.lost:
            return
        # Docker multiplexes a non-tty exec: 8-byte header (stream, 0, 0, 0, big-endian length).
        self._buffer += data
        offset = 0
        while len(self._buffer) - offset >= 8:
            kind = self._buffer[offset]
            (size,) = struct.unpack_from(">I", self._buffer, offset + 4)
            if size > self.max_line + 8:
                return self._violate(f"a {size}-byte frame from the worker")
            if len(self._buffer) - offset < 8 + size:
                break
            payload = bytes(self._buffer[offset + 8 : offset + 8 + size])
            offset += 8 + size
            if kind == 2:
                self._stderr.append(payload[-self.STDERR_KEEP :])
            elif not self._feed_stdout(payload):
                return
        del self._buffer[:offset]

    def _feed_stdout(self, payload: bytes) -> bool:
        """Add one frame's bytes to the current line; hand out each complete line. False once lost."""
        scan_from = len(self._line)  # only the new bytes can hold the newline: linear, not quadratic
        self._line += payload
        while (end := self._line.find(b"\n", scan_from)) >= 0:
            line = bytes(self._line[:end])
            del self._line[: end + 1]
            scan_from = 0
            if not self._deliver(line):
                return False
        if len(self._line) > self.max_line:
            self._violate(f"a reply line over {self.max_line} bytes from the worker")
            return False
        return True

    def _deliver(self, line: bytes) -> bool:
        pending = self._pending
        if pending is None or pending.done():
            self._violate("a line from the worker that answers no request")
            return False
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self._violate("a reply from the worker that is not a JSON object")
            return False
        pending.set_result(message)
        return True

    def _violate(self, why: str) -> None:
        self.violation = why
        log.warning("sandbox worker protocol violation: %s", why)
        self._feed_eof()

    def _feed_eof(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(WorkerLost(self.violation or "the worker stream ended"))
        self.lost = True
        self._buffer.clear()
        self._line.clear()

    def stderr_tail(self) -> str:
        return b"".join(self._stderr).decode("utf-8", "replace")[-2000:]

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one message, return the worker's reply to it.

        Raises WorkerLost when the stream ends or breaks the protocol (a reply whose id or nonce is
        not this request's included), TimeoutError past ``timeout``.
        """
        if self.lost:
            raise WorkerLost(self.violation or "the worker stream is closed")
        if self._pending is not None:
            raise RuntimeError("one request at a time on a worker channel")
        self._sent += 1
        ident, nonce = self._sent, secrets.token_hex(16)
        data = json.dumps({**message, "id": ident, "nonce": nonce}).encode() + b"\n"
        assert self._loop is not None
        self._pending = self._loop.create_future()
        try:
            try:
                if self._writer is not None:
                    self._writer.write(data)
                    await self._writer.drain()
                else:
                    await asyncio.to_thread(self._raw.sendall, data)
            except (OSError, RuntimeError) as exc:
                self.lost = True
                raise WorkerLost(f"cannot write to the worker: {exc}") from exc
            reply = await asyncio.wait_for(asyncio.shield(self._pending), timeout)
        finally:
            self._pending = None
        if reply.get("id") != ident or reply.get("nonce") != nonce:
            self._violate(f"a reply whose id or nonce is not its request's (op {str(reply.get('op'))[:20]!r})")
            raise WorkerLost(self.violation or "protocol violation")
        return reply

    def close(self) -> None:
        self.lost = True
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(WorkerLost("the worker stream was closed"))
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.transport.abort()  # unregisters the socket from the loop at once
        # Close the socket now rather than in the transport's deferred callback: the loop may be closed
        # before that runs, and the socket would then be left open until garbage collection.
        with contextlib.suppress(OSError):
            self._raw.close()


# ---------------------------------------------------------------------------------------------
# Engines, sandboxes, the pool


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
            raise RuntimeToolError(f"Docker engine call failed: {_short(exc)}") from exc

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
            error = exc if isinstance(exc, RuntimeToolError) else RuntimeToolError(f"sandbox start: {_short(exc)}")
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


class DockerEpisode:
    """One trajectory's container, taken from the pool on the first tool call."""

    def __init__(self, runtime: DockerRuntime, trajectory_id: str) -> None:
        self.runtime = runtime
        self.trajectory_id = trajectory_id
        self.sandbox: Sandbox | None = None
        self._lock = asyncio.Lock()
        self._calls = 0

    @property
    def container_id(self) -> str | None:
        return self.sandbox.container_id if self.sandbox is not None else None

    async def call(self, call: ToolCall, arguments: dict[str, Any], spec: ToolSpec) -> ToolOutput:
        async with self._lock:
            return await self._call(call, arguments, spec)

    async def _call(self, call: ToolCall, arguments: dict[str, Any], spec: ToolSpec) -> ToolOutput:
        rt = self.runtime
        cfg = rt.config
        request = self._request(spec.name, arguments)
        if isinstance(request, str):  # the call cannot run as written: the teacher is told why
            return _output(f"[error: {request}]", rt.max_chars, Observation(source="error"))
        started = time.monotonic()
        note = ""
        if self.sandbox is not None and (self.sandbox.dead or self.sandbox.channel.lost):
            rt.release(self.sandbox)
            self.sandbox = None
            note = RESTART_NOTE
        if self.sandbox is None:
            self.sandbox = await rt.acquire()
        sandbox = self.sandbox
        try:
            reply = await sandbox.channel.request(request, cfg.timeout_s + cfg.kill_grace_s)
        except TimeoutError:
            await rt.kill(sandbox)
            return _output(
                note + f"[timed out after {cfg.timeout_s:g} s and the sandbox stopped answering; "
                "it was killed, and the next call runs in a fresh one without earlier files]",
                rt.max_chars,
                Observation(source="executed", timed_out=True, duration_s=time.monotonic() - started),
            )
        except WorkerLost:
            if sandbox.channel.violation is not None:
                # Nothing from a channel that broke the protocol is trusted: not even that it failed.
                await rt.kill(sandbox)
                return _output(
                    note + "[the sandbox broke its protocol during this call and was replaced; "
                    "the next call runs in a fresh sandbox without files from earlier calls]",
                    rt.max_chars,
                    Observation(source="error", duration_s=time.monotonic() - started),
                )
            sandbox.dead = True
            oom = await rt.was_oom_killed(sandbox)
            why = "ran out of memory" if oom else "stopped"
            return _output(
                note + f"[the sandbox {why} during this call; the next call runs in a fresh sandbox "
                "without files from earlier calls]",
                rt.max_chars,
                Observation(
                    source="executed" if oom else "error",
                    exit_code=137 if oom else None,
                    oom_killed=oom,
                    duration_s=time.monotonic() - started,
                ),
            )
        if reply.get("op") != "result":
            raise RuntimeToolError(f"unexpected reply from the sandbox worker: {str(reply)[:200]}")
        oom_kills = reply.get("oom_kills")
        oom = bool(oom_kills) if oom_kills is not None else False
        if oom_kills is None and reply.get("signal") == 9 and not reply.get("timed_out"):
            oom = await rt.was_oom_killed(sandbox)  # no cgroup counter inside: ask the engine
        if oom or reply.get("timed_out"):
            sandbox.tainted = True  # replaced, not reset, when the trajectory ends
        content = note + render(reply, cfg.timeout_s, oom)
        return _output(
            content,
            rt.max_chars,
            Observation(
                source="executed",
                exit_code=reply.get("exit_code"),
                timed_out=bool(reply.get("timed_out")),
                oom_killed=oom,
                truncated=bool(reply.get("truncated")),
                duration_s=time.monotonic() - started,
            ),
        )

    def _request(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any] | str:
        """The worker request for one call, or why it cannot run (shown to the teacher, never raised)."""
        cfg = self.runtime.config
        if tool == "python":
            key, argv, file_argv = "code", [cfg.python, "-c"], [cfg.python]
        elif tool == "bash":
            key, argv, file_argv = "command", [cfg.shell, "-c"], [cfg.shell]
        else:
            return f"the Docker runtime has no tool named {tool!r}; use python or bash"
        source = arguments.get(key)
        if not isinstance(source, str):
            got = "nothing" if source is None else f"a JSON {type(source).__name__}"
            return f"tool {tool!r} needs a string argument {key!r}, got {got}"
        if "\x00" in source:
            return f"the {key} contains a NUL character, which no program text can hold"
        try:
            source.encode("utf-8")
        except UnicodeEncodeError:
            return f"the {key} contains a lone surrogate (invalid Unicode); send valid UTF-8 text"
        self._calls += 1
        return {
            "op": "run",
            "argv": argv,
            "file_argv": file_argv,
            "script": source,
            "python": tool == "python" and cfg.python_zygote and cfg.python == cfg.worker_command[0],
            "timeout_s": cfg.timeout_s,
            "keep_bytes": cfg.keep_bytes,
            "kill_bytes": cfg.kill_bytes,
            "cwd": cfg.work_dir,
            "env": SANDBOX_ENV,
        }

    async def close(self) -> None:
        if self.sandbox is not None:
            with contextlib.suppress(Exception):
                self.runtime.release(self.sandbox)
            self.sandbox = None


def render(reply: dict[str, Any], timeout_s: float, oom: bool) -> str:
    """What the model sees of one call: stdout, stderr under a marker, then what went wrong."""
    parts: list[str] = []
    stdout, stderr = str(reply.get("stdout") or ""), str(reply.get("stderr") or "")
    if stdout:
        parts.append(stdout.rstrip("\n"))
    if stderr:
        parts.append("[stderr]\n" + stderr.rstrip("\n"))
    if reply.get("error"):
        parts.append(f"[error: {reply['error']}]")
    if reply.get("timed_out"):
        parts.append(f"[timed out after {timeout_s:g} s: the command and its children were killed]")
    if oom:
        parts.append("[killed: out of memory]")
    if reply.get("output_capped"):
        total = int(reply.get("stdout_bytes") or 0) + int(reply.get("stderr_bytes") or 0)
        parts.append(f"[output too long ({total} bytes read): the command was killed]")
    code = reply.get("exit_code")
    if code not in (0, None):
        parts.append(f"[exit code {code}]")
    return "\n".join(parts) if parts else "[no output]"


def _output(content: str, max_chars: int, observation: Observation) -> ToolOutput:
    shown, cut = middle_truncate(content, max_chars)
    if cut:
        observation = observation.model_copy(update={"truncated": True})
    return ToolOutput(shown, observation)


def _close_result(call: Future[T], close: Callable[[T], Any]) -> None:
    if not call.cancelled() and call.exception() is None:
        close(call.result())


def _close_quietly(resource: Any) -> None:
    with contextlib.suppress(OSError):
        resource.close()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]
