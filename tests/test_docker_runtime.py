"""The Docker runtime against a real engine: ordinary calls, hardening, pool, sweeps, several engines."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docker_fixtures import (
    fast_config,
    own_containers,
    started,
    unavailable,
)
from tracegen.errors import RuntimeToolError
from tracegen.runtime.docker.pool import DockerRuntime
from tracegen.runtime.docker.settings import (
    DEFAULT_IMAGE,
    LABEL_CREATED,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_RUN,
    LABEL_TTL,
    DockerRuntimeConfig,
)
from tracegen.runtime.docker.sweep import sweep_engine
from tracegen.runtime.selfcheck import run

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("no_leftover_containers")]


@pytest.mark.anyio
async def test_stdout_stderr_and_exit_code(docker_client: Any) -> None:
    async with started() as rt:
        ep = await rt.open_episode("t")
        out = await run(ep, "bash", "echo to-out; echo to-err >&2; exit 3")
        assert out.content == "to-out\n[stderr]\nto-err\n[exit code 3]"
        assert out.observation.source == "executed"
        assert out.observation.exit_code == 3
        assert not (out.observation.timed_out or out.observation.truncated or out.observation.oom_killed)
        ok = await run(ep, "python", "print(6 * 7)")
        assert (ok.content, ok.observation.exit_code) == ("42", 0)
        err = await run(ep, "python", "raise SystemExit('bad input')")
        assert err.observation.exit_code == 1 and "bad input" in err.content
        tb = await run(ep, "python", "1/0")
        assert "ZeroDivisionError" in tb.content and tb.observation.exit_code == 1
        await ep.close()


@pytest.mark.anyio
async def test_state_persists_across_calls_and_tools(docker_client: Any) -> None:
    async with started() as rt:
        ep = await rt.open_episode("t")
        await run(ep, "bash", "mkdir -p data && echo 1,2,3 > data/x.csv")
        out = await run(ep, "python", "print(sum(map(int, open('data/x.csv').read().split(','))))")
        assert out.content == "6"
        # Compiled programs must run from the work dir: tmpfs is mounted exec.
        made = await run(ep, "bash", "printf '#!/bin/sh\\necho ran\\n' > ./tool.sh && chmod +x tool.sh && ./tool.sh")
        assert made.content == "ran"
        await ep.close()


@pytest.mark.anyio
async def test_non_utf8_output_is_shown_escaped(docker_client: Any) -> None:
    async with started() as rt:
        ep = await rt.open_episode("t")
        out = await run(ep, "bash", r"printf 'ok \xff\xfe end\n'; printf '\xc3' >&2")
        assert out.content == "ok \\xff\\xfe end\n[stderr]\n\\xc3"
        assert out.observation.exit_code == 0
        await ep.close()


@pytest.mark.anyio
async def test_concurrent_episodes_are_isolated(docker_client: Any) -> None:
    async with started(pool_size=2) as rt:
        episodes = [await rt.open_episode(f"t{i}") for i in range(6)]
        await asyncio.gather(*(run(ep, "bash", f"echo {i} > mine.txt") for i, ep in enumerate(episodes)))
        seen = await asyncio.gather(*(run(ep, "bash", "cat *.txt") for ep in episodes))
        assert [o.content for o in seen] == [str(i) for i in range(6)]
        assert len({ep.container_id for ep in episodes}) == 6
        await asyncio.gather(*(ep.close() for ep in episodes))


@pytest.mark.anyio
async def test_model_sees_middle_truncated_output(docker_client: Any) -> None:
    async with started(max_chars=500) as rt:
        ep = await rt.open_episode("t")
        out = await run(ep, "python", "print('A' * 3000 + 'B' * 3000)")
        assert len(out.content) <= 500 and out.observation.truncated
        assert out.content.startswith("AAAA") and out.content.endswith("BBBB")
        assert "elided" in out.content
        await ep.close()


@pytest.mark.anyio
async def test_long_code_runs_through_a_file(docker_client: Any) -> None:
    async with started() as rt:
        ep = await rt.open_episode("t")
        code = "x = 0\n" + "x += 1\n" * 20000 + "print(x)"  # ~140 KB: over one argv string's limit
        out = await run(ep, "python", code)
        assert out.content == "20000"
        await ep.close()


@pytest.mark.anyio
async def test_containers_are_hardened_and_labelled(docker_client: Any) -> None:
    async with started() as rt:
        ep = await rt.open_episode("t")
        await run(ep, "bash", "true")
        info = docker_client.api.inspect_container(ep.container_id)
        host, cfg = info["HostConfig"], info["Config"]
        assert host["NetworkMode"] == "none"
        assert host["ReadonlyRootfs"] is True
        assert host["CapDrop"] == ["ALL"]
        # The worker's three capabilities; commands run as another uid with none (selfcheck: privileges).
        assert sorted(host["CapAdd"]) == ["KILL", "SETGID", "SETUID"]
        assert host["LogConfig"]["Type"] == "none"  # nothing inside can grow a log on the host's disk
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["PidsLimit"] == rt.config.pids_limit
        assert host["Memory"] == host["MemorySwap"] == 256 * 1024**2
        assert host["NanoCpus"] == 1_000_000_000
        assert host["Init"] is True and host["AutoRemove"] is True
        assert set(host["Tmpfs"]) == {"/work", "/tmp"} and "size=" in host["Tmpfs"]["/work"]
        assert {u["Name"] for u in host["Ulimits"]} == {"nofile", "fsize"}
        assert cfg["User"] == "0:0"  # the worker and PID 1; commands run as 1000:1000
        whoami = await run(ep, "bash", "id -u; id -g; id -G")
        assert whoami.content.split() == ["1000", "1000", "1000"]
        assert cfg["Cmd"] == ["sleep", str(rt.config.ttl_s)]  # the backstop after kill -9
        assert not any(e.startswith("TRACEGEN_") for e in cfg["Env"])
        labels = cfg["Labels"]
        assert labels[LABEL_MANAGED] == "tracegen" and labels[LABEL_RUN] == rt.run_id
        assert labels[LABEL_OWNER].split(":")[1] == str(os.getpid())
        assert int(labels[LABEL_TTL]) == rt.config.ttl_s and int(labels[LABEL_CREATED]) <= time.time()
        await ep.close()


@pytest.mark.anyio
async def test_close_and_aclose_remove_every_container(docker_client: Any) -> None:
    async with started(pool_size=3, recycle=False) as rt:  # recycled containers are kept: tested below
        ep = await rt.open_episode("t")
        await run(ep, "bash", "true")
        cid = ep.container_id
        await ep.close()
        for _ in range(50):  # removal runs in the background
            if not any(c["Id"] == cid for c in own_containers(docker_client)):
                break
            await asyncio.sleep(0.1)
        assert not any(c["Id"] == cid for c in own_containers(docker_client))
        await asyncio.sleep(1.0)  # let the pool refill
        assert own_containers(docker_client), "the warm pool keeps containers ready"
    assert own_containers(docker_client) == []


@pytest.mark.anyio
async def test_aclose_during_an_attach_closes_the_stream_it_returns(docker_client: Any) -> None:
    """aclose() cancels the pool's fill tasks; a worker stream that arrives after that is closed.

    Before, the attach's socket was dropped open and the garbage collector warned about it later,
    in whatever test was running then.
    """
    attaching, release = threading.Event(), threading.Event()
    streams: list[Any] = []
    real_attach = DockerRuntime._attach_worker

    def slow_attach(runtime: DockerRuntime, engine: Any, cid: str) -> Any:
        if streams:  # the first container, made by start(), attaches at once; the pool's next one waits
            attaching.set()
            release.wait(30)
        streams.append(real_attach(runtime, engine, cid))
        return streams[-1]

    runtime = DockerRuntime(fast_config(pool_size=2, prefill=False))
    runtime._attach_worker = functools.partial(slow_attach, runtime)  # type: ignore[method-assign]
    await runtime.start()
    assert await asyncio.to_thread(attaching.wait, 30), "the pool never started its second container"
    closing = asyncio.create_task(runtime.aclose())
    await asyncio.sleep(0.3)  # aclose() has cancelled the fill task; the attach still runs
    release.set()
    await closing
    assert len(streams) == 2
    assert [stream.fileno() for stream in streams] == [-1, -1], "a worker stream was left open"
    assert own_containers(docker_client) == []


@pytest.mark.anyio
async def test_worker_that_stops_answering_gets_its_container_killed(docker_client: Any) -> None:
    async with started(timeout_s=1.0, kill_grace_s=1.0) as rt:
        ep = await rt.open_episode("t")
        await run(ep, "bash", "echo x > f")
        first = ep.container_id
        # A frozen worker never replies: the host's own deadline has to act. Commands cannot
        # signal the worker, so the test stops it from outside, as root in the container.
        assert ep.sandbox is not None
        stop = docker_client.api.exec_create(first, ["bash", "-c", f"kill -STOP {ep.sandbox.worker_pid}"], user="0:0")
        docker_client.api.exec_start(stop["Id"])
        frozen = await run(ep, "bash", "echo never-read")
        assert frozen.observation.timed_out and 1.9 <= frozen.observation.duration_s < 5
        after = await run(ep, "bash", "ls; echo alive")
        assert "alive" in after.content and "restarted" in after.content
        assert ep.container_id != first
        await ep.close()


@pytest.mark.anyio
async def test_capacity_per_engine_is_respected(docker_client: Any) -> None:
    async with started(pool_size=0, max_containers_per_engine=2) as rt:
        a, b, c = [await rt.open_episode(n) for n in "abc"]
        await run(a, "bash", "true")
        await run(b, "bash", "true")
        third = asyncio.ensure_future(run(c, "bash", "echo third"))
        await asyncio.sleep(1.0)
        assert not third.done(), "a third container would exceed the engine's capacity"
        await a.close()
        assert (await asyncio.wait_for(third, 20)).content == "third"
        await asyncio.gather(b.close(), c.close())


@pytest.mark.anyio
async def test_missing_image_is_a_runtime_error_with_a_hint(docker_client: Any) -> None:
    rt = DockerRuntime(fast_config(image="tracegen-no-such-image:0"))
    try:
        with pytest.raises(RuntimeToolError) as info:
            await rt.start()
        assert "tracegen sandbox build" in (info.value.hint or "")
    finally:
        await rt.aclose()


@pytest.mark.anyio
async def test_unreachable_engine_is_a_runtime_error(docker_client: Any) -> None:
    rt = DockerRuntime(fast_config(engines=["unix:///nonexistent/docker.sock"]))
    try:
        with pytest.raises(RuntimeToolError, match="no Docker engine answers"):
            await rt.start()
    finally:
        await rt.aclose()


def test_sweep_removes_dead_owners_and_expired_containers(docker_client: Any) -> None:
    def leftover(owner: str, created: int, ttl: int) -> str:
        labels = {
            LABEL_MANAGED: "tracegen",
            LABEL_RUN: "sweeptest",
            LABEL_OWNER: owner,
            LABEL_CREATED: str(created),
            LABEL_TTL: str(ttl),
        }
        c = docker_client.containers.run(
            DEFAULT_IMAGE, ["sleep", "120"], detach=True, labels=labels, network_mode="none"
        )
        return str(c.id)

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    now = int(time.time())
    gone_owner = leftover(f"{host}:{dead.pid}:1", now, 3600)
    expired = leftover("other-host:1:1", now - 7200, 3600)
    alive = leftover(f"{host}:{os.getpid()}:0", now, 3600)
    # A live run's container between create and start: another process's sweep must not take it.
    starting = docker_client.api.create_container(
        DEFAULT_IMAGE,
        ["sleep", "120"],
        labels={
            LABEL_MANAGED: "tracegen",
            LABEL_RUN: "sweeptest",
            LABEL_OWNER: f"{host}:{os.getpid()}:0",
            LABEL_CREATED: str(now),
            LABEL_TTL: "3600",
        },
    )["Id"]
    try:
        report = sweep_engine(docker_client)
        ids = {c["Id"] for c in docker_client.api.containers(all=True, filters={"label": f"{LABEL_RUN}=sweeptest"})}
        assert gone_owner not in ids and expired not in ids and alive in ids
        assert starting in ids, "a created container of a live owner was swept"
        assert report.removed >= 2
    finally:
        for cid in (gone_owner, expired, alive, starting):
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, check=False)


# -- several engines -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_engine(docker_client: Any) -> Iterator[str]:
    """A second dockerd on this machine, with its own socket and data root, holding the sandbox image."""
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        unavailable("a second Docker engine needs root and dockerd")
    base = Path("/var/lib/tracegen-test-engine")  # same filesystem as the first engine: overlay2 works
    run_dir = Path("/run/tracegen-test-engine")
    for d in (base, run_dir):
        d.mkdir(parents=True, exist_ok=True)
    sock = run_dir / "docker.sock"
    log = open(base / "dockerd.log", "ab")  # noqa: SIM115  # lives as long as the daemon
    proc = subprocess.Popen(
        [
            str(dockerd),
            "--host",
            f"unix://{sock}",
            "--data-root",
            str(base / "data"),
            "--exec-root",
            str(run_dir / "exec"),
            "--pidfile",
            str(run_dir / "docker.pid"),
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
        ],
        stdout=log,
        stderr=log,
    )
    url = f"unix://{sock}"
    try:
        import docker

        for _ in range(120):  # until the daemon listens (docker-py's own probe leaks sockets on failure)
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(str(sock)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"the second dockerd did not start; see {base / 'dockerd.log'}")
        client = docker.DockerClient(base_url=url, version="auto")
        client.ping()
        from tracegen.runtime.image import copy_image

        copy_image(docker_client, client, DEFAULT_IMAGE)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.anyio
async def test_containers_spread_over_two_engines(docker_client: Any, second_engine: str) -> None:
    default = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"

    config = fast_config(engines=[default, second_engine], pool_size=0, max_containers_per_engine=3)
    async with started(config) as rt:
        episodes = [await rt.open_episode(f"t{i}") for i in range(6)]
        outs = await asyncio.gather(*(run(ep, "bash", "echo $HOSTNAME") for ep in episodes))
        assert all(o.observation.exit_code == 0 for o in outs)
        per_engine = [e.live for e in rt.engines]
        assert per_engine == [3, 3], per_engine
        await asyncio.gather(*(ep.close() for ep in episodes))
    import docker

    other = docker.DockerClient(base_url=second_engine, version="auto")
    try:
        assert own_containers(other) == []
    finally:
        other.close()


def test_default_config_validates_and_forbids_unknown_keys() -> None:
    config = DockerRuntimeConfig()
    assert config.network_mode == "none" and config.read_only and config.drop_capabilities
    with pytest.raises(ValueError, match="extra"):
        DockerRuntimeConfig.model_validate({"imagee": "x"})
    for name, info in DockerRuntimeConfig.model_fields.items():
        assert info.description, f"{name} has no description"


# -- tracegen sandbox build|check|cleanup ------------------------------------------------------


def test_cli_build_reports_the_path_and_cleanup_counts(docker_client: Any) -> None:
    from typer.testing import CliRunner

    from tracegen.cli.sandbox import sandbox_app

    runner = CliRunner()
    built = runner.invoke(sandbox_app, ["build"], env={"COLUMNS": "200"})
    assert built.exit_code == 0, built.output
    assert DEFAULT_IMAGE in built.stdout and ("registry" in built.stdout or "offline" in built.stdout)
    cleaned = runner.invoke(sandbox_app, ["cleanup", "--stale-only"], env={"COLUMNS": "200"})
    assert cleaned.exit_code == 0, cleaned.output
    assert "removed" in cleaned.stdout


@pytest.mark.slow
def test_cli_check_prints_every_case_passing(docker_client: Any) -> None:
    from typer.testing import CliRunner

    from tracegen.cli.sandbox import sandbox_app
    from tracegen.runtime.selfcheck import CASES

    result = CliRunner().invoke(sandbox_app, ["check"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name, _, _ in CASES:
        assert name in result.stdout
    assert "NO" not in result.stdout


# -- recycling ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_recycled_container_shows_nothing_of_the_last_trajectory(docker_client: Any) -> None:
    """One container, two trajectories: a file, a process, a /dev/shm segment, SysV objects are gone."""
    from tracegen.runtime.selfcheck import LEAVE_STATE, LOCK_WORK_DIR, SHOW_STATE, leftovers

    async with started(pool_size=0, max_containers_per_engine=1) as rt:
        first = await rt.open_episode("first")
        await run(first, "bash", LEAVE_STATE)
        dirty = leftovers(json.loads((await run(first, "python", SHOW_STATE)).content))
        await run(first, "bash", LOCK_WORK_DIR)
        assert any("left.txt" in x for x in dirty) and any("SysV" in x for x in dirty), dirty
        used = first.container_id
        await first.close()
        second = await rt.open_episode("second")
        seen = await run(second, "python", SHOW_STATE)
        assert second.container_id == used, "capacity 1: the same container must come back"
        assert leftovers(json.loads(seen.content)) == []
        assert len(rt.reset_seconds) == 1
        await second.close()


@pytest.mark.anyio
async def test_recycle_off_and_tainted_containers_are_replaced(docker_client: Any) -> None:
    async with started(pool_size=0, max_containers_per_engine=1, recycle=False) as rt:
        a = await rt.open_episode("a")
        await run(a, "bash", "true")
        first = a.container_id
        await a.close()
        b = await rt.open_episode("b")
        await run(b, "bash", "true")
        assert b.container_id != first
        await b.close()
    async with started(pool_size=0, max_containers_per_engine=1, timeout_s=1.0) as rt:
        a = await rt.open_episode("a")
        assert (await run(a, "bash", "sleep 10")).observation.timed_out
        first = a.container_id
        await a.close()
        b = await rt.open_episode("b")
        await run(b, "bash", "true")
        assert b.container_id != first, "a container whose call timed out is replaced, not reset"
        await b.close()
    async with started(pool_size=0, max_containers_per_engine=1, recycle_max_uses=2) as rt:
        ids = []
        for name in "abc":
            ep = await rt.open_episode(name)
            await run(ep, "bash", "true")
            ids.append(ep.container_id)
            await ep.close()
        assert ids[0] == ids[1] != ids[2], "recycle_max_uses bounds the trajectories per container"


# From inside a call: how long ago its own process started, and the other processes of its uid.
SPARE_PROBE = """
import os
def field(pid, name):
    return [line.split()[1] for line in open(f'/proc/{pid}/status') if line.startswith(name)][0]
started = int(open('/proc/self/stat').read().rsplit(')', 1)[1].split()[19]) / os.sysconf('SC_CLK_TCK')
age = float(open('/proc/uptime').read().split()[0]) - started
mine = str(os.getuid())
others = [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid() and field(p, 'Uid:') == mine]
print(age > 0.5, others, field('self', 'CapEff:'))
"""


@pytest.mark.anyio
async def test_a_call_runs_in_a_spare_started_ahead_and_alone_as_the_sandbox_user(docker_client: Any) -> None:
    """While the container idles, the worker forks the next call's process (the fork costs no call's
    time), already the sandbox user without capabilities; no other process of that user exists then,
    so no call can reach the process of the next one, and after a call nothing of it is left."""
    async with started() as rt:
        ep = await rt.open_episode("t")
        await run(ep, "bash", "sleep 300 & echo started")  # left behind: killed when the call returns
        await asyncio.sleep(1.0)
        # `exec` keeps the shell's process: the probe then asks about the process the bash call ran in.
        for tool, probe in (("python", SPARE_PROBE), ("bash", f"exec python3 -c {shlex.quote(SPARE_PROBE)}")):
            out = await run(ep, tool, probe)
            assert out.content == "True [] 0000000000000000", (tool, out.content)
            await asyncio.sleep(1.0)
        # A command execs with the signal defaults a shell gives it, not the interpreter's ignored SIGPIPE.
        assert (await run(ep, "bash", "yes | head -1")).content == "y"
        await ep.close()


@pytest.mark.anyio
async def test_a_reset_keeps_the_waiting_spare_for_the_next_trajectory(docker_client: Any) -> None:
    """The spare forked after a trajectory's last call ran nothing of it, so the reset keeps it (one fork
    less per trajectory): the next trajectory's first call, made at once, runs in that process, alone."""
    async with started() as rt:
        first = await rt.open_episode("first")
        await run(first, "bash", "sleep 300 & echo left behind > here.txt")
        used = first.container_id
        await asyncio.sleep(1.0)  # the spare is forked 0.1 s after the reply
        await first.close()  # reset: kills the sleep, empties /work, keeps the spare
        second = await rt.open_episode("second")
        out = await run(second, "python", SPARE_PROBE)
        assert second.container_id == used
        assert out.content == "True [] 0000000000000000"  # started before the reset; no other process
        assert (await run(second, "bash", "ls -A")).content == "[no output]"
        await second.close()


@pytest.mark.anyio
async def test_python_calls_fork_from_a_warm_interpreter_as_the_sandbox_user(docker_client: Any) -> None:
    async with started() as rt:
        ep = await rt.open_episode("t")
        script = (
            "import os, sys, atexit\n"
            "atexit.register(lambda: print('at exit'))\n"
            "print(os.getuid(), os.getgid(), os.getgroups(), sys.argv, repr(sys.path[0]), __name__)\n"
            "caps = open('/proc/self/status').read().count('CapEff:\t0000000000000000')\n"
            "fds = sorted(int(fd) for fd in os.listdir('/proc/self/fd'))\n"
            "kinds = [(os.readlink(f'/proc/self/fd/{fd}').split(':')[0], os.stat(fd).st_uid) for fd in fds[4:]]\n"
            "print(fds[:4], kinds, caps)"
        )
        out = await run(ep, "python", script)
        assert out.content.splitlines() == [
            "1000 1000 [] ['-c'] '' __main__",
            # 3 is listdir's own descriptor; the one more is the spare's end of its report pipe (it tells
            # the worker the exit status; the selfcheck's "forged exit report" shows what writing to it
            # gains). Nothing of the worker's.
            "[0, 1, 2, 3] [('pipe', 0)] 1",
            "at exit",
        ]
        cold = rt.config.model_copy(update={"python_zygote": False})
        rt.config = cold
        same = await run(ep, "python", script)
        assert same.content.splitlines()[0] == "1000 1000 [] ['-c'] '' __main__"
        await ep.close()
