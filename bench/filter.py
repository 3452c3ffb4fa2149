"""Filter benchmark: cheap-check throughput on one core, and judge throughput against its ideal bound.

``python bench/filter.py`` (``--quick`` for a smoke run of a few seconds).

1. Cheap checks. ``N`` (default 100,000) synthetic trajectories (``tracegen.testing.synthetic``:
   3 turns, 3 tool calls, ~4 KB of JSON each), pinned to one core. Final answers mix the notations
   the reference rules meet: 40 % "The answer is N.", 20 % ``\\boxed{N}``, 15 % thousands separators
   and units ("1,234 apples"), 10 % fractions against decimal references (``\\frac{1}{4}`` vs 0.25),
   10 % wrong answers, 5 % symbolic answers from a pool of 20 expressions (math-verify; its results
   are cached, as they are in a real run where many samples share an answer). Reported:

   - checks/s: ``structural + duplicate + reference`` over records already in memory (the target:
     >= 20,000/s). Measured on a second pass with every answer cache cleared, after a first pass
     that also pays math-verify's one-off import and warm-up (~2-4 CPU-s, printed beside it);
   - end to end: ``run_filter`` on the file (parse, checks, kept/rejected/report written atomically)
     against two baselines run in the same process on the same file: ``json.loads`` of every line
     (the floor of any JSONL reader) and pydantic ``Trajectory.model_validate_json`` of every line
     (what reading the records costs).

2. Judge throughput. A fake OpenAI server in its own process answers every judge request with a
   valid JSON verdict after ``--latency`` seconds (half before the first token, half streaming).
   ``run_filter --verifier judge`` at judge concurrency 64 over ``--judge-samples`` trajectories,
   timed end to end (reading, journal fsyncs and outputs included). Ideal bound:
   ``concurrency / latency`` verdicts per second. Target: >= 0.9 of it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tracegen.checks import answers
from tracegen.checks.registry import build_checks
from tracegen.config import FilterConfig
from tracegen.filter import Item, cheap_checks, read_items, run_filter
from tracegen.records import Trajectory
from tracegen.testing.synthetic import make_trajectory

SYMBOLIC = [
    ("(x+1)^2", "x^2 + 2x + 1"),
    ("\\frac{\\pi}{2}", "pi/2"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("x^2 - 1", "(x-1)(x+1)"),
    ("\\sqrt{3}", "\\sqrt{2}"),
] + [(f"{a}x + {b}", f"{b} + {a}x") for a, b in zip(range(2, 17), range(3, 18), strict=True)]


def synthetic(i: int) -> Trajectory:
    t = make_trajectory(i)
    value = i * 3
    bucket = i % 100
    if bucket < 40:
        answer, reference = f"The answer is {value}.", str(value)
    elif bucket < 60:
        answer, reference = f"So we get \\boxed{{{value}}}", str(value)
    elif bucket < 75:
        answer, reference = f"{value * 1000:,} apples", str(value * 1000)
    elif bucket < 85:
        answer, reference = f"\\boxed{{\\frac{{1}}{{{value + 1}}}}}", f"{1 / (value + 1):.12f}"
    elif bucket < 95:
        answer, reference = f"The answer is {value + 1}.", str(value)
    else:
        answer, reference = SYMBOLIC[i % len(SYMBOLIC)]
    return t.model_copy(update={"final_answer": answer, "task": t.task.model_copy(update={"reference": reference})})


def cheap_bench(n: int, workdir: Path) -> dict[str, float]:
    path = workdir / "synthetic.jsonl"
    started = time.perf_counter()
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(synthetic(i).model_dump_json() + "\n")
    print(f"wrote {n:,} trajectories ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s")
    config = FilterConfig(verifiers=["reference"])

    gc.disable()
    items = read_items(path)
    fresh = [Item(it.t, it.line_hash) for it in items]
    warm = [Item(it.t, it.line_hash) for it in items]
    gc.freeze()  # as run_filter does: the records are long-lived, never garbage
    gc.enable()
    # Cold: a fresh process's first pass, which pays math-verify's import (sympy, ANTLR) and its first
    # parses once. Steady: the same pass again in the same process, the per-trajectory rate that a
    # long run converges to. Both are printed; the target is about the per-trajectory rate.
    t0 = time.perf_counter()
    asyncio.run(cheap_checks(fresh, build_checks(config), config))  # all three are cheap: the bench's verifiers
    cold_s = time.perf_counter() - t0
    for cached in (
        answers.math_verify_equal,
        answers.normalise,
        answers.parse_number,
        answers.is_text,
        answers.phrase_equal,
    ):
        cached.cache_clear()  # the steady pass computes every answer again (the symbolic pairs parsed again too)
    t0 = time.perf_counter()
    asyncio.run(cheap_checks(warm, build_checks(config), config))
    checks_s = time.perf_counter() - t0
    assert [it.failed for it in warm] == [it.failed for it in fresh]
    rules: dict[str, int] = {}
    for it in fresh:
        for v in it.verdicts:
            if v.check == "reference":
                rules[v.reason.split(":", 1)[0]] = rules.get(v.reason.split(":", 1)[0], 0) + 1
    passed = sum(1 for it in fresh if not it.failed)
    del items, fresh, warm
    gc.unfreeze()
    gc.collect()

    t0 = time.perf_counter()
    with path.open(encoding="utf-8") as f:
        for line in f:
            json.loads(line)
    json_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with path.open(encoding="utf-8") as f:
        for line in f:
            Trajectory.model_validate_json(line)
    pydantic_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    summary = run_filter(path, workdir / "out", config, show_progress=False)
    e2e_s = time.perf_counter() - t0
    assert summary.report["trajectories"] == n
    result = {
        "checks_per_s": n / checks_s,
        "checks_cold_per_s": n / cold_s,
        "one_off_s": cold_s - checks_s,
        "json_loads_per_s": n / json_s,
        "pydantic_parse_per_s": n / pydantic_s,
        "end_to_end_per_s": n / e2e_s,
        "passed": passed,
    }
    print(f"reference rules: {rules}; passed every check: {passed:,} of {n:,}")
    print(
        f"cheap checks (structural + duplicate + reference), records in memory: {result['checks_per_s']:,.0f}/s "
        f"(target >= 20,000/s: {'met' if result['checks_per_s'] >= 20_000 else 'NOT met'})"
    )
    print(
        f"  first pass in a fresh process: {result['checks_cold_per_s']:,.0f}/s, i.e. a one-off "
        f"{result['one_off_s']:.1f} s (math-verify's import and first parses) on top of the steady rate"
    )
    print(f"baseline json.loads per line:            {result['json_loads_per_s']:,.0f}/s")
    # The 20k/s target was set on a machine where this baseline ran 45,568/s (README), i.e. at 0.44 of
    # json.loads; absolute rates are not comparable across machines, this ratio in one run is.
    ratio, target = result["checks_per_s"] / result["json_loads_per_s"], 20_000 / 45_568
    print(
        f"cheap checks / json.loads in this run: {ratio:.2f} (the 20,000/s target, set where json.loads "
        f"ran 45,568/s, is {target:.2f} of it: {'met' if ratio >= target else 'NOT met'})"
    )
    print(f"baseline pydantic parse per line:        {result['pydantic_parse_per_s']:,.0f}/s")
    print(
        f"run_filter end to end (parse, checks, outputs): {result['end_to_end_per_s']:,.0f}/s = "
        f"{result['end_to_end_per_s'] / result['pydantic_parse_per_s']:.2f} x pydantic parse alone, "
        f"{result['end_to_end_per_s'] / result['json_loads_per_s']:.2f} x json.loads alone"
    )
    return result


SERVER = """
import asyncio, json, sys
from tracegen.testing.fake_server import serve, text_reply
latency = float(sys.argv[1])
body = json.dumps({"verdict": "pass", "score": 0.9, "rationale": "The answer follows from the tool output."})
def script(request):
    reply = text_reply(body, pieces=4)
    reply.delay_s = latency / 2
    reply.event_delay_s = -latency / 2
    return reply
async def main():
    server = await serve(script, 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def judge_bench(n: int, concurrency: int, latency: float, workdir: Path) -> float:
    path = workdir / "judge.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(make_trajectory(i).model_dump_json() + "\n")
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(latency)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        judge = {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": "judge",
            "concurrency": concurrency,
        }
        config = FilterConfig.model_validate({"verifiers": ["judge"], "judge": judge})
        run_filter(path, workdir / "warmup", config.model_copy(update={"verifiers": ["judge"]}), show_progress=False)
        t0 = time.perf_counter()
        summary = run_filter(path, workdir / "judged", config, show_progress=False)
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait()
    assert summary.report["checks"]["judge"]["passed"] == n, summary.report["checks"]
    rate = n / wall
    bound = concurrency / latency
    print(
        f"judge: {n} verdicts at concurrency {concurrency}, {latency * 1000:.0f} ms per reply: {wall:.2f} s, "
        f"{rate:,.1f}/s; ideal bound {bound:,.1f}/s; ratio {rate / bound:.3f} "
        f"(target >= 0.9: {'met' if rate / bound >= 0.9 else 'NOT met'})"
    )
    return rate / bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--judge-samples", type=int, default=1280)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 5,000 trajectories, 256 judge samples")
    args = parser.parse_args()
    if args.quick:
        args.trajectories, args.judge_samples = 5_000, 256
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for this process
    print(f"python {platform.python_version()}, {os.cpu_count()} cores on the machine, this process pinned to one")
    with tempfile.TemporaryDirectory() as tmp:
        cheap_bench(args.trajectories, Path(tmp))
        judge_bench(args.judge_samples, args.concurrency, args.latency, Path(tmp))


if __name__ == "__main__":
    main()
