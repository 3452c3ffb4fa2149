"""Per-call overhead and throughput of the Docker sandbox, against the naive ways, in one run.

    .venv/bin/python bench/sandbox.py            # needs a Docker engine and `tracegen sandbox build`

Three ways to run one ``bash`` tool call (``true``) in a hardened sandbox container:

- warm pool: tracegen's runtime (one persistent worker per container, one JSON line per call);
- exec: a fresh ``docker exec`` per call into a running container (create, start, inspect);
- run: ``docker run --rm`` per call (a new container each time).

Latency is end to end as a caller sees it. Overhead is latency minus what the command itself costs
inside the container (``bash -c true`` measured in a loop in there), so it is what each way adds.
Then throughput: 32 concurrent trajectories of 10 calls each (container hand-out and removal
included), warm pool against exec-per-call; the python tool from the warm interpreter against
``python3 -c``; the verified reset of a recycled container (p50/p95), against the CPU a fresh
container costs. Every ratio is against a baseline measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracegen.runtime.docker.pool import DockerRuntime
from tracegen.runtime.docker.settings import SANDBOX_ENV, DockerRuntimeConfig
from tracegen.runtime.docker.sweep import connect
from tracegen.runtime.selfcheck import run

COMMAND = ["bash", "-c", "true"]
# The command's own cost, timed in the container (same load, same limits), interleaved with the
# pool's calls so both see the same machine.
INSIDE = (
    "import subprocess, time\n"
    "for _ in range(40):\n"
    "    t = time.perf_counter(); subprocess.run(['bash', '-c', 'true']); print(time.perf_counter() - t)"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def host_config(client: Any, config: DockerRuntimeConfig) -> Any:
    """The runtime's own hardening, so the baselines run the same container."""
    runtime = DockerRuntime(config)
    _, host = runtime._container_spec()
    return client.api.create_host_config(**{**host, "auto_remove": False})


def start_container(client: Any, config: DockerRuntimeConfig) -> str:
    api = client.api
    cid: str = api.create_container(
        config.image,
        command=["sleep", "600"],
        user=config.user,
        working_dir=config.work_dir,
        environment=SANDBOX_ENV,
        labels={"tracegen.bench": "baseline"},
        host_config=host_config(client, config),
    )["Id"]
    api.start(cid)
    return cid


def exec_call(client: Any, cid: str, config: DockerRuntimeConfig) -> int:
    api = client.api
    exec_id = api.exec_create(cid, COMMAND, user=config.user, workdir=config.work_dir)["Id"]
    api.exec_start(exec_id)
    code: int = api.exec_inspect(exec_id)["ExitCode"]
    return code


def run_call(client: Any, config: DockerRuntimeConfig) -> None:
    client.containers.run(
        config.image,
        COMMAND,
        remove=True,
        user=config.user,
        working_dir=config.work_dir,
        environment=SANDBOX_ENV,
        network_mode=config.network_mode,
        read_only=config.read_only,
        tmpfs=config.tmpfs,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        pids_limit=config.pids_limit,
        mem_limit=config.mem_limit,
        memswap_limit=config.mem_limit,
        nano_cpus=int(config.cpus * 1e9),
        init=True,
    )


def timed(fn: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


async def pool_latencies(config: DockerRuntimeConfig, n: int, batches: int = 5) -> tuple[list[float], list[float]]:
    runtime = DockerRuntime(config)
    await runtime.start()
    try:
        ep = await runtime.open_episode("bench")
        for _ in range(20):  # warm-up
            await run(ep, "bash", "true")
        latencies: list[float] = []
        inside: list[float] = []
        for _ in range(batches):
            for _ in range(n // batches):
                t = time.perf_counter()
                out = await run(ep, "bash", "true")
                latencies.append(time.perf_counter() - t)
                assert out.observation.exit_code == 0, out.content
            timing = await run(ep, "python", INSIDE)
            inside += [float(x) for x in timing.content.split()]
        await ep.close()
        return latencies, inside
    finally:
        await runtime.aclose()


async def pool_throughput(config: DockerRuntimeConfig, trajectories: int, calls: int) -> float:
    runtime = DockerRuntime(config)
    await runtime.start()
    try:

        async def one(i: int) -> None:
            ep = await runtime.open_episode(f"t{i}")
            for _ in range(calls):
                out = await run(ep, "bash", "true")
                assert out.observation.exit_code == 0, out.content
            await ep.close()

        t = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(trajectories)))
        return time.perf_counter() - t
    finally:
        await runtime.aclose()


async def python_latencies(config: DockerRuntimeConfig, n: int) -> dict[bool, list[float]]:
    """`print(1)` through the python tool, forked from the worker's warm interpreter and as `python3 -c`."""
    runtime = DockerRuntime(config)
    await runtime.start()
    try:
        ep = await runtime.open_episode("bench-python")
        out: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(n):
            for zygote in (True, False):  # interleaved, so both see the same machine
                runtime.config = config.model_copy(update={"python_zygote": zygote})
                t = time.perf_counter()
                assert (await run(ep, "python", "print(1)")).content == "1"
                out[zygote].append(time.perf_counter() - t)
        await ep.close()
        return out
    finally:
        await runtime.aclose()


async def reset_times(config: DockerRuntimeConfig, n: int) -> tuple[list[float], list[float]]:
    """One container, ``n`` trajectories that each write files: the worker's reset time, and the hand-over
    as the next trajectory sees it (release to its first call's answer)."""
    one = config.model_copy(update={"pool_size": 0, "max_containers_per_engine": 1, "prefill": False})
    runtime = DockerRuntime(one)
    await runtime.start()
    handovers: list[float] = []
    try:
        for i in range(n):
            ep = await runtime.open_episode(f"bench-reset-{i}")
            await run(ep, "bash", "echo x > a.txt; mkdir -p d; seq 1000 > d/b.txt; echo s > /dev/shm/s")
            t = time.perf_counter()
            await ep.close()
            nxt = await runtime.open_episode(f"bench-reset-next-{i}")
            assert (await run(nxt, "bash", "ls -A")).content == "[no output]"
            handovers.append(time.perf_counter() - t)
            await nxt.close()
        return list(runtime.reset_seconds), handovers
    finally:
        await runtime.aclose()


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process, engine included), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


async def fresh_container_cpu(config: DockerRuntimeConfig, n: int) -> float:
    """Machine CPU seconds per trajectory's fresh container (create, start, attach, one call, remove), in sequence.

    What a run that gives every trajectory its own container must pay per trajectory, whatever the pool
    does: on C cores it caps such a run at C / this many trajectories per second.
    """
    fresh = {**config.model_dump(), "pool_size": 0, "prefill": False, "recycle": False}
    runtime = DockerRuntime(DockerRuntimeConfig(**fresh))
    await runtime.start()
    busy = machine_busy_s()
    for i in range(n):
        ep = await runtime.open_episode(f"fresh-{i}")
        assert (await run(ep, "bash", "true")).observation.exit_code == 0
        await ep.close()
    await runtime.aclose()
    await asyncio.sleep(2)  # the removals finish in the engine
    return (machine_busy_s() - busy) / n


def exec_throughput(client: Any, config: DockerRuntimeConfig, trajectories: int, calls: int) -> float:
    def one(_: int) -> None:
        cid = start_container(client, config)
        try:
            for _ in range(calls):
                assert exec_call(client, cid, config) == 0
        finally:
            client.api.remove_container(cid, force=True)

    t = time.perf_counter()
    with ThreadPoolExecutor(trajectories) as pool:
        list(pool.map(one, range(trajectories)))
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-calls", type=int, default=300)
    parser.add_argument("--exec-calls", type=int, default=40)
    parser.add_argument("--run-calls", type=int, default=12)
    parser.add_argument("--trajectories", type=int, default=32)
    parser.add_argument("--calls-per-trajectory", type=int, default=10)
    args = parser.parse_args()

    config = DockerRuntimeConfig(pool_size=8, max_starting=2, api_threads=32)
    client = connect(None, threads=args.trajectories + 4)

    pool, inside_samples = asyncio.run(pool_latencies(config, args.pool_calls))
    inside = pct(inside_samples, 0.5)
    cid = start_container(client, config)
    try:
        exec_call(client, cid, config)  # warm-up
        execs = timed(lambda: exec_call(client, cid, config), args.exec_calls)
    finally:
        client.api.remove_container(cid, force=True)
    run_call(client, config)  # warm-up
    runs = timed(lambda: run_call(client, config), args.run_calls)

    rows = [("warm pool", pool), ("docker exec per call", execs), ("docker run --rm per call", runs)]
    print(f"one `bash -c true` call; the command itself costs {inside * 1e3:.2f} ms inside the container\n")
    print(f"{'method':26} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'overhead p50 ms':>16} {'vs warm pool':>13}")
    pool_over = pct(pool, 0.5) - inside
    for name, values in rows:
        p50, p95 = pct(values, 0.5), pct(values, 0.95)
        over = p50 - inside
        print(
            f"{name:26} {len(values):4d} {p50 * 1e3:8.2f} {p95 * 1e3:8.2f} {over * 1e3:16.2f} {over / pool_over:12.1f}x"
        )
    exec_ratio = (pct(execs, 0.5) - inside) / pool_over
    run_ratio = (pct(runs, 0.5) - inside) / pool_over
    raw_exec = pct(execs, 0.5) / pct(pool, 0.5)
    raw_run = pct(runs, 0.5) / pct(pool, 0.5)
    print(
        f"\noverhead ratio: docker exec / warm pool = {exec_ratio:.0f}x (target >= 20), "
        f"docker run / warm pool = {run_ratio:.0f}x (target >= 100)"
    )
    print(
        f"end-to-end latency ratio: docker exec / warm pool = {raw_exec:.0f}x, docker run / warm pool = {raw_run:.0f}x"
    )

    n, k = args.trajectories, args.calls_per_trajectory
    pool_wall = asyncio.run(pool_throughput(config, n, k))
    exec_wall = exec_throughput(client, config, n, k)
    total = n * k
    print(f"\nthroughput, {n} concurrent trajectories x {k} calls (container hand-out and removal included):")
    print(f"  warm pool            {pool_wall:6.2f} s  {total / pool_wall:7.1f} calls/s")
    print(f"  docker exec per call {exec_wall:6.2f} s  {total / exec_wall:7.1f} calls/s")
    print(f"  warm pool / exec speed-up: {exec_wall / pool_wall:.1f}x")

    python = asyncio.run(python_latencies(config, 60))
    warm, cold = pct(python[True], 0.5), pct(python[False], 0.5)
    print(
        f"\npython tool, `print(1)`: warm interpreter (zygote) p50 {warm * 1e3:.2f} ms, p95 "
        f"{pct(python[True], 0.95) * 1e3:.2f} ms; `python3 -c` p50 {cold * 1e3:.2f} ms, p95 "
        f"{pct(python[False], 0.95) * 1e3:.2f} ms; ratio python3 -c / zygote = {cold / warm:.1f}x"
    )
    resets, handovers = asyncio.run(reset_times(config, 40))
    print(
        f"verified reset of a used container ({len(resets)} resets): p50 {pct(resets, 0.5) * 1e3:.2f} ms, p95 "
        f"{pct(resets, 0.95) * 1e3:.2f} ms in the worker; release to the next trajectory's first answer p50 "
        f"{pct(handovers, 0.5) * 1e3:.2f} ms, p95 {pct(handovers, 0.95) * 1e3:.2f} ms"
    )

    per_container = asyncio.run(fresh_container_cpu(config, 16))
    cores = os.cpu_count() or 1
    print(
        f"\nfresh container per trajectory: {per_container:.3f} CPU-s of machine CPU each (16 in sequence, all "
        f"processes counted); {cores} cores sustain at most {cores / per_container:.1f} such trajectories/s"
    )
    client.close()


if __name__ == "__main__":
    main()
