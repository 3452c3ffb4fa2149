"""Where the CPU of one sandbox tool call goes, by process group: load-independent, in one run.

    .venv/bin/python bench/sandbox_cpu.py        # needs a Docker engine and `tracegen sandbox build`

Wall-clock ratios mean nothing on a shared machine; CPU seconds do. With ``--containers`` recycled
containers held by as many trajectories, the script runs ``--waves`` waves of one concurrent
``python`` call each (``print(6 * 7)``, the collect benchmark's tool call), then ``--rounds`` rounds
of trajectory turnover (release: verified reset; acquire; one call), and reads, before and after each
phase, the CPU time consumed by:

- client: this process (``time.process_time``, all threads): the runtime's host side;
- dockerd, containerd, shims: their ``/proc/<pid>/stat`` utime + stime (all threads, exact sums
  reported in 10 ms ticks, so runs are long enough for that not to matter);
- containers: ``cpuacct.usage`` of each container's cgroup (cgroup v1) or ``cpu.stat`` ``usage_usec``
  (v2): worker, forked children, PID 1;
- other: the rest of the machine's busy time (``/proc/stat``): other users of the machine, noise.

Each transport named by ``--channels`` is measured the same way, back to back, so their ratio holds
whatever else the machine does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracegen.runtime.docker.episode import DockerEpisode
from tracegen.runtime.docker.pool import DockerRuntime
from tracegen.runtime.docker.settings import DockerRuntimeConfig
from tracegen.runtime.selfcheck import run

TICK = os.sysconf("SC_CLK_TCK")
GROUPS = ("client", "dockerd", "containerd", "shims", "containers", "other")


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _engine_pids() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"dockerd": [], "containerd": [], "shims": []}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            comm = Path(f"/proc/{name}/comm").read_text().strip()
        except OSError:
            continue
        if comm == "dockerd":
            found["dockerd"].append(int(name))
        elif comm == "containerd":
            found["containerd"].append(int(name))
        elif comm.startswith("containerd-shim"):
            found["shims"].append(int(name))
    return found


def _cgroup_cpu(cid: str) -> float:
    for path in (f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage", f"/sys/fs/cgroup/docker/{cid}/cpuacct.usage"):
        with_ns = Path(path)
        if with_ns.exists():
            return int(with_ns.read_text()) / 1e9
    for path in (f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat", f"/sys/fs/cgroup/docker/{cid}/cpu.stat"):
        if Path(path).exists():
            for line in Path(path).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
    raise RuntimeError(f"no readable cgroup CPU counter for container {cid[:12]}")


def _machine_busy() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def snapshot(runtime: DockerRuntime) -> dict[str, float]:
    """CPU seconds so far, per group (containers: this runtime's live ones)."""
    pids = _engine_pids()
    cids = {s.container_id for s in [*runtime._ready, *runtime._in_use, *runtime._resetting]}
    out = {group: sum(_proc_cpu(pid) for pid in pids[group]) for group in ("dockerd", "containerd", "shims")}
    out["client"] = time.process_time()
    out["containers"] = sum(_cgroup_cpu(cid) for cid in cids)
    out["busy"] = _machine_busy()
    return out


def per_unit(before: dict[str, float], after: dict[str, float], units: int) -> dict[str, float]:
    """Milliseconds per unit, per group; ``other`` is the machine's busy time none of the groups explains."""
    delta = {k: after[k] - before[k] for k in before}
    delta["other"] = delta.pop("busy") - sum(delta[g] for g in GROUPS if g != "other")
    delta["total"] = sum(delta[g] for g in GROUPS)
    return {k: 1000 * v / units for k, v in delta.items()}


async def measure(channel: Literal["exec", "socket"], containers: int, waves: int, rounds: int) -> dict[str, dict[str, float]]:
    config = DockerRuntimeConfig(
        pool_size=containers, prefill=True, mem_limit="512m", recycle=True, channel=channel, max_starting=4
    )
    runtime = DockerRuntime(config)
    await runtime.start()
    try:
        episodes: list[DockerEpisode] = [await runtime.open_episode(f"cpu-{i}") for i in range(containers)]

        async def wave() -> None:
            outs = await asyncio.gather(*(run(ep, "python", "print(6 * 7)") for ep in episodes))
            assert all(o.content == "42" for o in outs), [o.content for o in outs if o.content != "42"][:3]

        await wave()  # every episode holds its container; warm-up
        await wave()
        before = snapshot(runtime)
        for _ in range(waves):
            await wave()
        calls = per_unit(before, snapshot(runtime), waves * containers)

        async def settle() -> None:  # every reset done, every container back in the pool
            while runtime._resetting:
                await asyncio.sleep(0.01)

        before = snapshot(runtime)
        for r in range(rounds):
            for ep in episodes:
                await ep.close()
            await settle()
            episodes = [await runtime.open_episode(f"cpu-{r}-{i}") for i in range(containers)]
            await wave()
        turnover = per_unit(before, snapshot(runtime), rounds * containers)
        resets = {k: turnover[k] - calls[k] for k in turnover}  # one reset + hand-out, less its call
        for ep in episodes:
            await ep.close()
        await settle()
        return {"call": calls, "reset": resets}
    finally:
        await runtime.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=16)
    parser.add_argument("--waves", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--channels", default="exec,socket", help="transports to compare, in this order")
    args = parser.parse_args()
    results = {}
    for channel in args.channels.split(","):
        results[channel] = asyncio.run(measure(channel, args.containers, args.waves, args.rounds))  # type: ignore[arg-type]
    print(
        f"CPU ms by process group; {args.containers} containers, {args.waves} waves of calls "
        f"({args.waves * args.containers} python calls), {args.rounds} rounds of turnover, {os.cpu_count()} CPUs"
    )
    print(f"{'':16}" + "".join(f"{g:>11}" for g in (*GROUPS, "total")))
    for channel, parts in results.items():
        for what, ms in parts.items():
            print(f"{channel + ' / ' + what:16}" + "".join(f"{ms[g]:11.3f}" for g in (*GROUPS, "total")))
    if len(results) == 2:
        (a, pa), (b, pb) = results.items()
        known = [g for g in GROUPS if g != "other"]
        ratio = sum(pa["call"][g] for g in known) / sum(pb["call"][g] for g in known)
        print(f"per call, {a} / {b}, all groups but other: {ratio:.2f}x")


if __name__ == "__main__":
    main()
