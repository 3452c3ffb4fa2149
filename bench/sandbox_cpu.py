"""Where the CPU of one sandbox tool call goes, by process group: load-independent, in one run.

    .venv/bin/python bench/sandbox_cpu.py        # needs a Docker engine and `tracegen sandbox build`

Wall-clock ratios mean nothing on a shared machine; CPU seconds do. With ``--containers`` recycled
containers held by as many trajectories, the script runs ``--waves`` waves of one concurrent
``python`` call each (``print(6 * 7)``, the collect benchmark's tool call), ``--pause`` seconds apart
(the teacher's turn in collect), and reads, before and after each wave and after each pause, the CPU
time consumed by:

- client: this process (``time.process_time``, all threads): the runtime's host side;
- dockerd, containerd, shims (ours): their ``/proc/<pid>/stat`` utime + stime (all threads, exact
  sums reported in 10 ms ticks, so runs are long enough for that not to matter); dockerd and
  containerd serve whoever else uses the engine too;
- containers: ``cpuacct.usage`` of each container's cgroup (cgroup v1) or ``cpu.stat`` ``usage_usec``
  (v2): worker, forked children, PID 1;
- other: the rest of the machine's busy time (``/proc/stat``): other users of the machine, noise.

"In the wave" is what a call costs on its path (a wave of lock-step calls queues on it); "after it"
is what the worker does once it has replied (its next call's spare). Each image named by ``--images``
is measured the same way, back to back, so their ratio holds whatever else the machine does (the
host code is this checkout's for both; the worker is the image's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracegen.runtime.docker.episode import DockerEpisode
from tracegen.runtime.docker.pool import DockerRuntime
from tracegen.runtime.docker.settings import DEFAULT_IMAGE, DockerRuntimeConfig
from tracegen.runtime.selfcheck import run

TICK = os.sysconf("SC_CLK_TCK")
GROUPS = ("client", "dockerd", "containerd", "shims", "containers", "other")


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def _engine_pids(cids: list[str]) -> dict[str, list[int]]:
    """dockerd's and containerd's pids (shared with anyone else using the engine), and our containers' shims."""
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
            with contextlib.suppress(OSError):
                if any(cid in Path(f"/proc/{name}/cmdline").read_text() for cid in cids):
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


def snapshot(pids: dict[str, list[int]], cids: list[str]) -> dict[str, float]:
    """CPU seconds so far, per group. The client's is read first, so the snapshot's own reads don't count."""
    out = {"client": time.process_time()}
    out.update({group: sum(_proc_cpu(pid) for pid in pids[group]) for group in ("dockerd", "containerd", "shims")})
    out["containers"] = sum(_cgroup_cpu(cid) for cid in cids)
    out["busy"] = _machine_busy()
    return out


class Tally:
    """CPU seconds per group, summed over the windows added."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys((*GROUPS[:-1], "busy"), 0.0)

    def add(self, before: dict[str, float], after: dict[str, float]) -> None:
        for key in self.seconds:
            self.seconds[key] += after[key] - before[key]

    def per(self, units: int) -> dict[str, float]:
        """Milliseconds per unit, per group; ``other`` is the machine's busy time none of the groups explains."""
        ms = {k: 1000 * v / units for k, v in self.seconds.items()}
        ms["other"] = ms.pop("busy") - sum(ms[g] for g in GROUPS[:-1])
        ms["total"] = sum(ms[g] for g in GROUPS)
        return ms


async def measure(image: str, containers: int, waves: int, pause_s: float) -> dict[str, dict[str, float]]:
    """Per call: CPU while a wave of calls runs (its path), and in the pause after it (spares starting)."""
    config = DockerRuntimeConfig(image=image, pool_size=containers, prefill=True, mem_limit="512m", max_starting=4)
    runtime = DockerRuntime(config)
    await runtime.start()
    try:
        episodes: list[DockerEpisode] = [await runtime.open_episode(f"cpu-{i}") for i in range(containers)]

        async def wave() -> None:
            outs = await asyncio.gather(*(run(ep, "python", "print(6 * 7)") for ep in episodes))
            assert all(o.content == "42" for o in outs), [o.content for o in outs if o.content != "42"][:3]

        for _ in range(2):  # every episode holds its container; warm-up
            await wave()
        cids = [ep.container_id or "" for ep in episodes]
        pids = _engine_pids(cids)
        during, after = Tally(), Tally()
        await asyncio.sleep(pause_s)
        for _ in range(waves):
            s0 = snapshot(pids, cids)
            await wave()
            s1 = snapshot(pids, cids)
            await asyncio.sleep(pause_s)  # the teacher's turn, in collect
            during.add(s0, s1)
            after.add(s1, snapshot(pids, cids))
        for ep in episodes:
            await ep.close()
        calls = waves * containers
        return {"in the wave": during.per(calls), "after it": after.per(calls)}
    finally:
        await runtime.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containers", type=int, default=16)
    parser.add_argument("--waves", type=int, default=40)
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between waves (the teacher's turn)")
    parser.add_argument("--images", default=DEFAULT_IMAGE, help="sandbox images to compare, comma-separated, in order")
    args = parser.parse_args()
    results = [
        (image, asyncio.run(measure(image, args.containers, args.waves, args.pause)))
        for image in args.images.split(",")
    ]
    print(
        f"CPU ms per python call by process group: {args.containers} containers, {args.waves} waves "
        f"({args.waves * args.containers} calls), {args.pause:g} s between waves, {os.cpu_count()} CPUs"
    )
    print(f"{'':44}" + "".join(f"{g:>11}" for g in (*GROUPS, "total")))
    for image, parts in results:
        for window, ms in parts.items():
            print(f"{image + ' / ' + window:44}" + "".join(f"{ms[g]:11.3f}" for g in (*GROUPS, "total")))

    def cpu(parts: dict[str, dict[str, float]], window: str) -> float:
        return sum(parts[window][g] for g in GROUPS[:-1])  # every group but other

    for (a, pa), (b, pb) in zip(results[::2], results[1::2], strict=False):  # A,B[,A,B...]: pairs back to back
        ratios = ", ".join(f"{w} {cpu(pa, w) / cpu(pb, w):.2f}x" for w in pa)
        whole = sum(cpu(pa, w) for w in pa) / sum(cpu(pb, w) for w in pb)
        print(f"{a} / {b}, every group but other: {ratios}; wave and pause together {whole:.2f}x")


if __name__ == "__main__":
    main()
