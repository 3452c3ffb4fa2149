"""Collect throughput benchmark: tracegen against inspect_ai, on one fake OpenAI-compatible server, and
tracegen's three teacher APIs (chat completions, Responses, Anthropic Messages) against each other.

What is measured (``python bench/collect.py``; ``--quick`` for a smoke run of a few seconds):

- The teacher is :mod:`tracegen.testing.fake_server`'s ReAct script (``turns - 1`` python tool calls,
  then an answer) in its own process, so its CPU is never charged to the client. Every teacher
  reply takes a fixed latency (half before the first token, half while streaming).
- tracegen runs ``collect`` with the simulated runtime, which sends one extra request per tool call
  to the simulator (the same server). The bound below counts teacher turns only, and inspect_ai's
  tools run locally with no latency, so by default simulator replies are served with **no added
  latency** (``--sim-latency`` changes that). Their client CPU is still tracegen's: CPU per turn
  charges all of it to teacher turns, and CPU per HTTP request spreads it over every request.
- inspect_ai runs the same prompts through its own tool loop (``use_tools`` + ``generate``) with a
  local ``python`` tool returning a fixed string, streaming on (``streaming=True`` model arg),
  ``max_connections`` = ``max_samples`` = concurrency, no display, its eval log kept in memory
  (``memory://``), realtime sample buffer, control socket and trace log off.
- Each engine level runs in a fresh subprocess: one warm-up run (imports, first connections), then
  the measured run. Client CPU is ``time.process_time()`` (all threads) around the measured run only.
- The ``tracegen-responses`` and ``tracegen-anthropic`` levels run the same collect with ``teacher.api:
  responses`` / ``anthropic``: the same server and script, whose replies it streams in that API's events
  (the simulator stays on chat completions, as it does in a real run).
- Ideal bound: ``concurrency / (turns x latency)`` trajectories per second.

Targets: >= 0.9 of the bound at concurrency 64 / 200 ms and at 256 / 1000 ms; <= 2.5 ms of client CPU per
streamed turn; >= 4x inspect_ai's trajectories per second at concurrency 64 (issue 2); <= 1 ms of client
CPU per turn for the chat API at concurrency 64 / 200 ms, and every API's ratio to the bound (issue 15).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

TURNS = 4
APIS = ("responses", "anthropic")  # teacher.api levels beside chat completions
PROMPT = "Compute 6 * 7 with the python tool, then state the answer."


@dataclass(frozen=True)
class Level:
    engine: str
    """tracegen | tracegen-responses | tracegen-anthropic (teacher.api) | tracegen-docker (sandbox, recycled
    containers) | tracegen-docker-fresh | inspect_ai"""
    concurrency: int
    latency_s: float
    trajectories: int


@dataclass
class Result:
    level: Level
    wall_s: float
    cpu_s: float
    completed: int
    turns: int
    http_requests: int
    server_cpu_s: float
    problems: list[str]
    tool_share: float = 0.0
    """Fraction of trajectory time spent in tool calls (vs waiting for the teacher)."""
    mean_trajectory_s: float = 0.0
    steady_wall_s: float = 0.0
    """From the first trajectory's start to the last one's end: the run without runtime start-up."""

    @property
    def steady_fraction(self) -> float:
        return (self.completed / self.steady_wall_s) / self.bound if self.steady_wall_s else 0.0

    @property
    def throughput(self) -> float:
        return self.completed / self.wall_s if self.wall_s else 0.0

    @property
    def bound(self) -> float:
        return self.level.concurrency / (TURNS * self.level.latency_s)

    @property
    def fraction(self) -> float:
        return self.throughput / self.bound

    @property
    def cpu_ms_per_turn(self) -> float:
        return 1000 * self.cpu_s / self.turns if self.turns else float("nan")

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu_s / self.http_requests if self.http_requests else float("nan")


def plan(quick: bool, docker: bool = False) -> list[Level]:
    """The levels to run: ~4x concurrency trajectories per level (at least 8), so waves repeat."""
    if quick:
        return [
            Level("tracegen", 1, 0.05, 2),
            Level("tracegen", 16, 0.05, 32),
            *(Level(f"tracegen-{api}", 16, 0.05, 32) for api in APIS),
            Level("inspect_ai", 16, 0.05, 32),
        ]
    levels = [Level("tracegen", c, 0.2, max(8, 4 * c)) for c in (1, 16, 64, 256)]
    levels[3:3] = [Level(f"tracegen-{api}", 64, 0.2, 4 * 64) for api in APIS]  # beside chat's, same load
    levels.append(Level("tracegen", 256, 1.0, 4 * 256))
    levels.append(Level("inspect_ai", 64, 0.2, 4 * 64))
    if docker:
        # Four waves of 32, with containers recycled after a verified reset (the default) and with a
        # fresh container per trajectory: what the container-creation rate of this machine sustains.
        levels.append(Level("tracegen-docker", 32, 0.2, 128))
        levels.append(Level("tracegen-docker-fresh", 32, 0.2, 128))
    return levels


# ----------------------------------------------------------------------------------------------
# The fake teacher, in its own process


def serve(latency_s: float, sim_latency_s: float, turns: int, chunks: int) -> None:
    """Run the fake server (``--serve``): the ReAct script, with its own latency for simulator calls."""
    import asyncio

    from tracegen.testing.fake_server import ReactScript, Reply, Request
    from tracegen.testing.fake_server import serve as start_server

    teacher = ReactScript(turns, latency_s, chunks)

    def script(request: Request) -> Reply:
        reply = teacher(request)
        if not request.get("tools"):  # a tool-simulator request
            reply.delay_s = sim_latency_s / 2
            reply.event_delay_s = -sim_latency_s / 2 if sim_latency_s else 0.0
        return reply

    async def run() -> None:
        server = await start_server(script)
        print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
        await server.serve_forever()

    asyncio.run(run())


class ServerProcess:
    def __init__(self, latency_s: float, sim_latency_s: float, chunks: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                "--latency",
                str(latency_s),
                "--sim-latency",
                str(sim_latency_s),
                "--chunks",
                str(chunks),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http"):
            self.close()
            raise RuntimeError("fake server did not start")
        self.base_url = line

    def cpu_s(self) -> float:
        """utime + stime of the server process (Linux /proc), 0 elsewhere."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------------------------
# Workers: one engine, one level, in a fresh process; print one JSON line


def _write_tasks(path: Path, n: int, prefix: str) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{prefix}-{i}", "prompt": f"{PROMPT} (#{i})"}) + "\n")


def work_tracegen(
    base_url: str,
    concurrency: int,
    trajectories: int,
    runtime: str = "simulated",
    recycle: bool = True,
    api: str = "chat",
) -> dict[str, Any]:
    from tracegen.collect.driver import run_collect
    from tracegen.config import CollectConfig

    with tempfile.TemporaryDirectory(prefix="tracegen-bench-") as tmp:
        root = Path(tmp)

        def config(name: str, n: int, c: int) -> CollectConfig:
            _write_tasks(root / f"{name}.jsonl", n, name)
            return CollectConfig.model_validate(
                {
                    "tasks": str(root / f"{name}.jsonl"),
                    "teacher": {"base_url": base_url, "model": "fake", "api": api},
                    "runtime": runtime,
                    # 512m: the engine's default capacity (its memory / mem_limit) is 23 containers of
                    # 1g on a 24 GiB machine, fewer than the 32 trajectories in flight.
                    "docker": {"pool_size": c, "prefill": True, "recycle": recycle, "mem_limit": "512m"},
                    "tools": ["python"],
                    "concurrency": c,
                    "max_turns": TURNS + 4,
                }
            )

        run_collect(config("warmup", min(8, trajectories), min(8, concurrency)), root / "warmup", show_progress=False)
        measured = config("bench", trajectories, concurrency)
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        summary = run_collect(measured, root / "bench", show_progress=False)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0

        simulator_requests = 0
        problems: list[str] = []
        tool_s = teacher_s = trajectory_s = 0.0
        first_start, last_end = float("inf"), 0.0
        for line in (root / "bench" / "trajectories.jsonl").read_text().splitlines():
            record = json.loads(line)
            begun = datetime.fromisoformat(record["timing"]["started_at"]).timestamp()
            first_start, last_end = min(first_start, begun), max(last_end, begun + record["timing"]["wall_s"])
            tool_s += record["timing"]["tool_s"]
            teacher_s += record["timing"]["teacher_s"]
            trajectory_s += record["timing"]["wall_s"]
            simulator_requests += sum(
                1
                for m in record["messages"]
                if m["role"] == "tool" and (m.get("observation") or {}).get("source") == "simulated"
            )
            if record["stop_reason"] != "answer":
                problems.append(f"{record['task']['id']}: stop_reason={record['stop_reason']} {record['errors']}")
    if summary.turns != TURNS * summary.completed:
        problems.append(f"{summary.turns} turns for {summary.completed} trajectories")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "completed": summary.completed,
        "turns": summary.turns,
        "http_requests": summary.requests + simulator_requests,
        "tool_share": tool_s / (tool_s + teacher_s) if tool_s + teacher_s else 0.0,
        "mean_trajectory_s": trajectory_s / max(summary.completed, 1),
        "steady_wall_s": max(0.0, last_end - first_start),
        "problems": problems[:5],
    }


def work_inspect(base_url: str, concurrency: int, trajectories: int) -> dict[str, Any]:
    os.environ.setdefault("OPENAI_API_KEY", "EMPTY")
    os.environ["INSPECT_TRACE_LEVEL"] = "CRITICAL"  # no per-call trace lines written to its data dir

    from inspect_ai import Task, eval
    from inspect_ai.dataset import Sample
    from inspect_ai.log import EvalLog
    from inspect_ai.model import ChatMessageAssistant
    from inspect_ai.solver import generate, use_tools
    from inspect_ai.tool import Tool, tool

    @tool
    def python() -> Tool:
        async def execute(code: str) -> str:
            """Run Python code and return what it prints.

            Args:
                code: The program to run.
            """
            return "hello from the simulator\n"

        return execute

    def run(name: str, n: int, c: int) -> EvalLog:
        task = Task(
            name=name,
            dataset=[Sample(id=f"{name}-{i}", input=f"{PROMPT} (#{i})") for i in range(n)],
            solver=[use_tools(python()), generate()],
        )
        return eval(
            task,
            model="openai/fake",
            model_base_url=base_url,
            model_args={"streaming": True, "responses_api": False},  # chat completions, like tracegen
            display="none",
            log_level="error",
            log_dir="memory://inspect-bench",
            log_realtime=False,
            ctl_server=False,
            max_connections=c,
            max_samples=c,
            score=False,
            fail_on_error=False,
        )[0]

    run("warmup", min(8, trajectories), min(8, concurrency))
    gc.collect()
    cpu0, t0 = time.process_time(), time.perf_counter()
    log = run("bench", trajectories, concurrency)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    problems: list[str] = [] if log.status == "success" else [f"eval status {log.status}: {log.error}"]
    turns = completed = 0
    for sample in log.samples or []:
        sample_turns = sum(1 for m in sample.messages if isinstance(m, ChatMessageAssistant))
        turns += sample_turns
        if sample.error is None and sample_turns == TURNS and "42" in sample.output.completion:
            completed += 1
        else:
            error = sample.error.message.splitlines()[-1][:200] if sample.error else None
            problems.append(f"{sample.id}: {sample_turns} turns, error={error}")
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "completed": completed,
        "turns": turns,
        "http_requests": turns,
        "problems": problems[:5],
    }


def run_level(level: Level, server: ServerProcess, timeout_s: float) -> Result:
    cpu0 = server.cpu_s()
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            level.engine,
            "--base-url",
            server.base_url,
            "--concurrency",
            str(level.concurrency),
            "--trajectories",
            str(level.trajectories),
        ],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    server_cpu = server.cpu_s() - cpu0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{level} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(lines[-1])
    return Result(
        level=level,
        wall_s=data["wall_s"],
        cpu_s=data["cpu_s"],
        completed=data["completed"],
        turns=data["turns"],
        http_requests=data["http_requests"],
        server_cpu_s=server_cpu,
        problems=data["problems"],
        tool_share=data.get("tool_share", 0.0),
        mean_trajectory_s=data.get("mean_trajectory_s", 0.0),
        steady_wall_s=data.get("steady_wall_s", 0.0),
    )


# ----------------------------------------------------------------------------------------------
# Report


def table(results: list[Result]) -> str:
    head = (
        "| engine | concurrency | latency | trajectories | wall s | traj/s | bound/s | fraction of bound "
        "| CPU ms/turn | CPU ms/HTTP req | server CPU | tool time |"
    )
    rows = [head, "|" + "---|" * 12]
    for r in results:
        rows.append(
            f"| {r.level.engine} | {r.level.concurrency} | {r.level.latency_s * 1000:.0f} ms | {r.completed} "
            f"| {r.wall_s:.2f} | {r.throughput:.1f} | {r.bound:.1f} | {r.fraction:.2f} | {r.cpu_ms_per_turn:.2f} "
            f"| {r.cpu_ms_per_request:.2f} | {100 * r.server_cpu_s / r.wall_s:.0f}% | {100 * r.tool_share:.0f}% |"
        )
    return "\n".join(rows)


def verdicts(results: list[Result], quick: bool) -> list[str]:
    def find(engine: str, c: int, latency: float) -> Result | None:
        return next(
            (r for r in results if (r.level.engine, r.level.concurrency, r.level.latency_s) == (engine, c, latency)),
            None,
        )

    def mark(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    lines: list[str] = []
    peer_c, peer_latency = (16, 0.05) if quick else (64, 0.2)
    ours, peer = find("tracegen", peer_c, peer_latency), find("inspect_ai", peer_c, peer_latency)
    if ours and peer:
        ratio = ours.throughput / peer.throughput if peer.throughput else float("inf")
        cpu_ratio = peer.cpu_ms_per_turn / ours.cpu_ms_per_turn if ours.cpu_ms_per_turn else float("inf")
        lines.append(
            f"ratio tracegen/inspect_ai traj/s at concurrency {peer_c}, {peer_latency * 1000:.0f} ms: "
            f"{ratio:.2f}x ({ours.throughput:.1f} vs {peer.throughput:.1f})"
            + ("" if quick else f"  [target >= 4x: {mark(ratio >= 4)}]")
        )
        lines.append(
            f"ratio inspect_ai/tracegen client CPU per turn: {cpu_ratio:.2f}x "
            f"({peer.cpu_ms_per_turn:.2f} vs {ours.cpu_ms_per_turn:.2f} ms)"
        )
    chat = find("tracegen", peer_c, peer_latency)
    for api in APIS:
        other = find(f"tracegen-{api}", peer_c, peer_latency)
        if chat and other:
            lines.append(
                f"teacher.api {api} vs chat at concurrency {peer_c}, {peer_latency * 1000:.0f} ms: "
                f"{other.fraction:.2f} vs {chat.fraction:.2f} of the bound, "
                f"{other.cpu_ms_per_turn:.2f} vs {chat.cpu_ms_per_turn:.2f} ms CPU/turn"
            )
    if quick:
        return lines
    if chat:
        lines.append(
            f"tracegen chat API client CPU per turn at concurrency 64, 200 ms: {chat.cpu_ms_per_turn:.2f} ms  "
            f"[target <= 1 ms: {mark(chat.cpu_ms_per_turn <= 1.0)}]"
        )
    for c, latency in ((64, 0.2), (256, 1.0)):
        r = find("tracegen", c, latency)
        if r:
            lines.append(
                f"tracegen at concurrency {c}, {latency * 1000:.0f} ms: {r.fraction:.2f} of the bound  "
                f"[target >= 0.9: {mark(r.fraction >= 0.9)}]"
            )
    for r in (r for r in results if r.level.engine.startswith("tracegen-docker")):
        # From the first trajectory's start: the warm pool's prefill (container creation before the first
        # request) is start-up, paid once per run. Recycled containers must reach 0.9 of the bound.
        recycled = r.level.engine == "tracegen-docker"
        ideal_s = TURNS * r.level.latency_s
        lines.append(
            f"tracegen --runtime docker, {'recycled' if recycled else 'fresh'} containers, concurrency "
            f"{r.level.concurrency}, {r.completed} trajectories: {r.steady_fraction:.2f} of the bound after start-up "
            f"({r.fraction:.2f} with it); each trajectory {r.mean_trajectory_s:.3f} s vs the ideal {ideal_s:.1f} s "
            f"(tool calls {100 * r.tool_share:.0f}% of it)"
            + (f"  [target >= 0.9: {mark(r.steady_fraction >= 0.9)}]" if recycled else "")
        )
    on, off = find("tracegen-docker", 32, 0.2), find("tracegen-docker-fresh", 32, 0.2)
    if on and off and off.steady_fraction:
        lines.append(
            f"ratio recycled/fresh containers, traj/s after start-up: {on.steady_fraction / off.steady_fraction:.2f}x"
        )
    # Judged where the run is long enough (>= 1000 turns) that start-up (clients, TLS contexts, manifest,
    # task loading: ~0.1-0.2 s of CPU) is amortised; the concurrency-1 row shows it un-amortised.
    steady = [r for r in results if r.level.engine == "tracegen" and r.turns >= 1000]
    if steady:
        worst = max(steady, key=lambda r: r.cpu_ms_per_turn)
        lines.append(
            f"tracegen client CPU per streamed turn: worst {worst.cpu_ms_per_turn:.2f} ms (concurrency "
            f"{worst.level.concurrency}, {worst.level.latency_s * 1000:.0f} ms; {worst.cpu_ms_per_request:.2f} ms per "
            f"HTTP request)  [target <= 2.5 ms: {mark(worst.cpu_ms_per_turn <= 2.5)}]"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (a few seconds)")
    parser.add_argument("--chunks", type=int, default=16, help="stream deltas per teacher reply")
    parser.add_argument(
        "--sim-latency", type=float, default=0.0, help="seconds per simulator reply (default 0: tools are instant)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    # Internal modes: the fake server process, and one engine level in a fresh process.
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--latency", type=float, default=0.2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--worker",
        choices=[
            "tracegen",
            *(f"tracegen-{api}" for api in APIS),
            "tracegen-docker",
            "tracegen-docker-fresh",
            "inspect_ai",
        ],
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--docker", action="store_true", help="also run collect --runtime docker (needs an engine and the image)"
    )
    parser.add_argument("--docker-only", action="store_true", help="only the docker levels (recycled and fresh)")
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--trajectories", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve:
        serve(args.latency, args.sim_latency, TURNS, args.chunks)
        return 0
    if args.worker:
        if args.worker == "inspect_ai":
            result = work_inspect(args.base_url, args.concurrency, args.trajectories)
        else:
            runtime = "docker" if args.worker.startswith("tracegen-docker") else "simulated"
            recycle = args.worker != "tracegen-docker-fresh"
            api = args.worker.removeprefix("tracegen-") if args.worker.removeprefix("tracegen-") in APIS else "chat"
            result = work_tracegen(args.base_url, args.concurrency, args.trajectories, runtime, recycle, api)
        print(json.dumps(result), flush=True)
        return 0

    levels = plan(args.quick, args.docker or args.docker_only)
    if args.docker_only:
        levels = [level for level in levels if level.engine.startswith("tracegen-docker")]
    if importlib.util.find_spec("inspect_ai") is None:
        print("# inspect_ai is not installed (pip install -e '.[bench]'): its level is skipped", file=sys.stderr)
        levels = [level for level in levels if level.engine != "inspect_ai"]
    started = time.perf_counter()
    print(
        f"# collect benchmark: {TURNS}-turn trajectories, {args.chunks} deltas per reply, simulator latency "
        f"{args.sim_latency * 1000:.0f} ms; python {platform.python_version()}, {os.cpu_count()} CPUs"
        + (" (quick)" if args.quick else ""),
        flush=True,
    )
    results: list[Result] = []
    servers: dict[float, ServerProcess] = {}
    try:
        for level in levels:
            if level.latency_s not in servers:
                servers[level.latency_s] = ServerProcess(level.latency_s, args.sim_latency, args.chunks)
            result = run_level(level, servers[level.latency_s], timeout_s=120 if args.quick else 600)
            results.append(result)
            print(
                f"  {level.engine:<18} c={level.concurrency:<4} {level.latency_s * 1000:>5.0f} ms: "
                f"{result.throughput:7.1f} traj/s ({result.fraction:.2f} of bound), "
                f"{result.cpu_ms_per_turn:.2f} ms CPU/turn",
                file=sys.stderr,
                flush=True,
            )
    finally:
        for server in servers.values():
            server.close()

    print()
    print(table(results))
    print()
    for line in verdicts(results, args.quick):
        print(line)
    problems = [f"{r.level.engine} c={r.level.concurrency}: {p}" for r in results for p in r.problems]
    for p in problems:
        print(f"PROBLEM {p}")
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        **r.level.__dict__,
                        "wall_s": r.wall_s,
                        "cpu_s": r.cpu_s,
                        "completed": r.completed,
                        "turns": r.turns,
                        "http_requests": r.http_requests,
                        "traj_per_s": r.throughput,
                        "fraction_of_bound": r.fraction,
                        "cpu_ms_per_turn": r.cpu_ms_per_turn,
                        "cpu_ms_per_request": r.cpu_ms_per_request,
                        "server_cpu_s": r.server_cpu_s,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
