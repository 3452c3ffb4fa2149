"""Settings of the Docker sandbox (recipe section ``collect.docker``), its labels and fixed environment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tracegen.fingerprint import HOW

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

    image: str = Field(
        DEFAULT_IMAGE,
        description="Sandbox image; needs python3, bash, the tracegen worker (and node for javascript tests).",
    )
    engines: list[str] = Field(
        default_factory=list,
        description="Docker engines to spread containers over (unix://, tcp://, ssh:// URLs); "
        "empty means the one DOCKER_HOST (or the default socket) names.",
        json_schema_extra=HOW,
    )
    max_containers_per_engine: int | None = Field(
        None,
        ge=1,
        description="Containers per engine at once; default: engine memory / mem_limit.",
        json_schema_extra=HOW,
    )
    pool_size: int = Field(
        8,
        ge=0,
        description="Containers kept started ahead of need: idle ones, plus (with recycle) those in use, "
        "which come back after their reset.",
        json_schema_extra=HOW,
    )
    prefill: bool = Field(
        False,
        description="Wait at start-up until pool_size containers are ready, so the first wave never waits.",
        json_schema_extra=HOW,
    )
    max_starting: int = Field(
        2,
        ge=1,
        description="Containers being created at once (bounds the creation rate).",
        json_schema_extra=HOW,
    )
    api_threads: int = Field(
        16,
        ge=1,
        description="Threads for docker-py calls; each engine client's connection pool has this size.",
        json_schema_extra=HOW,
    )
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one tool call; its processes are killed at it.")
    kill_grace_s: float = Field(
        5.0,
        gt=0,
        description="Extra wait for the worker's reply before the host kills the container.",
        json_schema_extra=HOW,
    )
    start_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait for a new container's worker to answer.",
        json_schema_extra=HOW,
    )
    ttl_s: int = Field(
        6 * 3600,
        ge=60,
        description="Container lifetime (its first process is `sleep ttl`); sweeps remove older ones.",
        json_schema_extra=HOW,
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
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels on every container.",
        json_schema_extra=HOW,
    )
    recycle: bool = Field(
        True,
        description="Hand a container to the next trajectory after a verified reset (every process of the "
        "sandbox user killed, every writable mount emptied, its IPC objects removed, all of it checked) "
        "instead of replacing it. False: a fresh container per trajectory.",
        json_schema_extra=HOW,
    )
    recycle_max_uses: int = Field(
        50,
        ge=1,
        description="Trajectories one container serves before it is replaced.",
        json_schema_extra=HOW,
    )
    reset_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Longest wait for a reset; past it the container is replaced.",
        json_schema_extra=HOW,
    )
    python_zygote: bool = Field(
        True,
        description="Run `python` calls in a child forked from the worker's warm interpreter (about 1 ms "
        "instead of 10), with the same isolation per call; only when `python` is the worker's interpreter.",
        json_schema_extra=HOW,
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
