"""``tracegen filter`` end to end: checks in order, selection, report, resume without repeated judge calls,
bad input, Ctrl-C and kill -9 (real subprocesses, a real loopback judge)."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tracegen.config import FilterConfig
from tracegen.filter import pass_at_k, run_filter
from tracegen.records import AssistantMessage, Task, Trajectory, Usage
from tracegen.testing.fake_server import FakeServer, Script, Scripted, text_reply
from tracegen.testing.synthetic import make_trajectory

from .conftest import SECRET, start_tracegen, tracegen

ROOT = Path(__file__).parent.parent
Start = Callable[[Script], FakeServer]
GOOD = json.dumps({"verdict": "pass", "score": 0.9, "rationale": "correct and supported"})


def sample(task: int, k: int, answer: str | None, tokens: int = 100, reference: str | None = None) -> Trajectory:
    """Sample k of task ``task``: distinct reasoning per (task, k) unless the caller copies it."""
    base = make_trajectory(task * 10 + k)
    last = base.messages[-1]
    assert isinstance(last, AssistantMessage)
    messages = [*base.messages[:-1], last.model_copy(update={"content": answer or ""})]
    return base.model_copy(
        update={
            "id": f"t{task}-s{k}",
            "task": Task(id=f"t{task}", prompt=f"Task {task}?", reference=reference or str(task + 10)),
            "sample_index": k,
            "messages": messages,
            "final_answer": answer,
            "stop_reason": "answer" if answer else "max_turns",
            "usage": Usage(prompt_tokens=50, completion_tokens=tokens),
        }
    )


def write(path: Path, trajectories: list[Trajectory]) -> Path:
    path.write_text("".join(t.model_dump_json() + "\n" for t in trajectories))
    return path


def run_of_three_tasks(tmp_path: Path) -> Path:
    """t0: 2 right of 4 (one of them a duplicate), t1: 1 right of 4, t2: 0 right of 4."""
    s = [
        sample(0, 0, "The answer is 10.", tokens=300),
        sample(0, 1, "\\boxed{10}", tokens=120),
        sample(0, 2, "11"),
        sample(0, 3, None),
        sample(1, 0, "12"),
        sample(1, 1, "11.0", tokens=90),
        sample(1, 2, None),
        sample(1, 3, "13"),
        *(sample(2, k, "99") for k in range(4)),
    ]
    s[2] = s[0].model_copy(update={"id": "t0-s2", "sample_index": 2})  # an exact duplicate of t0-s0
    return write(tmp_path / "trajectories.jsonl", s)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pass_at_k_is_the_unbiased_estimator() -> None:
    for n, c, k in itertools.product(range(1, 7), range(7), range(1, 7)):
        if c > n or k > n:
            continue
        # brute force: the probability that a random k-subset holds at least one correct sample
        subsets = list(itertools.combinations([1] * c + [0] * (n - c), k))
        expected = sum(1 for s in subsets if any(s)) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), expected, abs_tol=1e-12), (n, c, k)


def test_cli_filter_reference_writes_kept_rejected_report_and_never_touches_the_input(tmp_path: Path) -> None:
    source = run_of_three_tasks(tmp_path)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "f"
    result = tracegen("filter", str(tmp_path), "--out", str(out), "--verifier", "reference", "-q")
    assert result.returncode == 0, result.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
    kept = {r["id"]: r for r in lines(out / "kept.jsonl")}
    rejected = {r["id"]: r for r in lines(out / "rejected.jsonl")}
    assert set(kept) == {"t0-s0", "t0-s1", "t1-s1"}
    assert len(rejected) == 9
    why = {i: [(v["check"], v["passed"], v["reason"]) for v in r["verdicts"]] for i, r in rejected.items()}
    assert why["t0-s2"][-1] == ("duplicate", False, "exact duplicate of t0-s0")  # stops at its first failure
    assert why["t0-s3"] == [("structural", False, "stop_reason=max_turns; no final answer")]
    assert why["t1-s0"][-1][:2] == ("reference", False) and why["t1-s0"][-1][2].startswith("numeric:")
    assert [v["check"] for v in kept["t0-s1"]["verdicts"]] == ["structural", "duplicate", "reference"]
    report = json.loads((out / "report.json").read_text())
    assert (report["trajectories"], report["kept"], report["rejected"]) == (12, 3, 9)
    assert report["checks"]["structural"] == {
        "ran": 12, "passed": 10, "failed": 2, "errors": 0, "reused": 0, "acceptance_rate": 0.8333
    }  # fmt: skip
    assert report["checks"]["duplicate"]["failed"] == 1
    # t0: 4 samples, 3 correct (the duplicate counts as its original); t1: 1 of 4; t2: 0 of 4
    assert report["tasks"]["t0"] == {
        "samples": 4, "passed": 3, "kept": 2, "errors": 0, "pass_at_1": 0.75, "pass_at_k": 1.0
    }  # fmt: skip
    assert report["tasks"]["t1"]["pass_at_1"] == 0.25 and report["tasks"]["t2"]["pass_at_k"] == 0.0
    assert report["pass_at_1"] == round((0.75 + 0.25 + 0) / 3, 4)
    assert report["tokens_kept"]["completion"] == 300 + 120 + 90
    assert report["reference_rules"]["numeric"] >= 1
    assert "structural" in result.stdout and "pass@1" in result.stdout and "kept / trajectories" in result.stdout


def test_all_checks_runs_every_check_on_every_sample(tmp_path: Path) -> None:
    source = run_of_three_tasks(tmp_path)
    summary = run_filter(source, tmp_path / "f", FilterConfig(all_checks=True), show_progress=False)
    rejected = {r["id"]: r for r in lines(tmp_path / "f" / "rejected.jsonl")}
    assert [v["check"] for v in rejected["t0-s3"]["verdicts"]] == ["structural", "duplicate", "reference"]
    assert summary.report["checks"]["reference"]["ran"] == 12


def test_selection_best_and_k(tmp_path: Path) -> None:
    source = run_of_three_tasks(tmp_path)
    best = run_filter(source, tmp_path / "best", FilterConfig(selection="best"), show_progress=False)
    kept = lines(tmp_path / "best" / "kept.jsonl")
    assert [r["id"] for r in kept] == ["t0-s1", "t1-s1"]  # t0: the shorter of its two right answers
    assert best.report["tasks"]["t0"]["kept"] == 1
    dropped = next(r for r in lines(tmp_path / "best" / "rejected.jsonl") if r["id"] == "t0-s0")
    assert dropped["verdicts"][-1]["check"] == "selection" and "rank 2 of 2" in dropped["verdicts"][-1]["reason"]
    run_filter(source, tmp_path / "k2", FilterConfig(selection="k", k=2), show_progress=False)
    assert {r["id"] for r in lines(tmp_path / "k2" / "kept.jsonl")} == {"t0-s0", "t0-s1", "t1-s1"}


def test_bad_input_is_one_line_with_file_and_line_and_writes_nothing(tmp_path: Path) -> None:
    good = sample(0, 0, "10").model_dump_json()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n" + '{"id": "x", "not": "a trajectory"}\n')
    result = tracegen("filter", str(bad), "--out", str(tmp_path / "f"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: {bad}:2: not a trajectory record")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "f").exists()
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    result = tracegen("filter", str(garbage), "--out", str(tmp_path / "f"))
    assert result.returncode == 2 and f"{garbage}:1:" in result.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text("filter:\n  verifiers: [reference]\n  selektion: best\n")
    result = tracegen("filter", str(bad), "--out", str(tmp_path / "f"), "--recipe", str(recipe))
    assert result.returncode == 2 and f"{recipe}:3: unknown key 'filter.selektion'" in result.stderr
    result = tracegen("filter", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "f"))
    assert result.returncode == 2 and "no such file" in result.stderr
    result = tracegen("filter", str(bad), "--out", str(tmp_path / "f"), "--verifier", "vibes")
    assert result.returncode == 2 and "filter.verifiers.0" in result.stderr
    result = tracegen("filter", str(bad), "--out", str(tmp_path / "f"), "--verifier", "judge")
    assert result.returncode == 2 and "no judge base url configured" in result.stderr
    # filtering a filter's own output into the same folder would overwrite the input
    run_filter(run_of_three_tasks(tmp_path), tmp_path / "g", FilterConfig(), show_progress=False)
    result = tracegen("filter", str(tmp_path / "g" / "kept.jsonl"), "--out", str(tmp_path / "g"))
    assert result.returncode == 2 and "the input is one of the outputs" in result.stderr


def judge_args(server: FakeServer) -> list[str]:
    return ["--verifier", "reference", "--verifier", "judge", "--judge-base-url", server.base_url, "--judge-model", "j"]


def test_resume_reuses_judge_verdicts_and_asks_only_when_the_rubric_changes(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(Scripted([], default=text_reply(GOOD)))
    source = run_of_three_tasks(tmp_path)
    out = tmp_path / "f"
    first = tracegen("filter", str(source), "--out", str(out), "-q", *judge_args(server))
    assert first.returncode == 0, first.stderr
    asked = len(server.requests)
    assert asked == 3  # only the samples that passed structural, duplicate and reference reach the judge
    kept_before = (out / "kept.jsonl").read_text()
    again = tracegen("filter", str(source), "--out", str(out), "-q", *judge_args(server))
    assert again.returncode == 0 and len(server.requests) == asked  # nothing asked twice
    assert (out / "kept.jsonl").read_text() == kept_before
    report = json.loads((out / "report.json").read_text())
    assert report["checks"]["judge"]["reused"] == 3 and report["judge"]["requests_this_run"] == 0
    assert report["judge"]["completion_tokens"] > 0  # usage of reused verdicts still counts
    judged = next(v for v in lines(out / "kept.jsonl")[0]["verdicts"] if v["check"] == "judge")
    assert judged["reason"] == "correct and supported" and judged["judge_model"] == "j"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("filter:\n  judge:\n    rubric: Be harsher.\n")
    changed = tracegen("filter", str(source), "--out", str(out), "-q", "--recipe", str(recipe), *judge_args(server))
    assert changed.returncode == 0 and len(server.requests) == asked + 3
    for path in out.iterdir():
        assert SECRET not in path.read_text()


def test_judge_errors_are_counted_kept_out_and_retried(fake_server: Start, tmp_path: Path) -> None:
    broken = fake_server(Scripted([], default=text_reply("As an AI I cannot grade.")))
    source = run_of_three_tasks(tmp_path)
    out = tmp_path / "f"
    result = tracegen("filter", str(source), "--out", str(out), "-q", *judge_args(broken))
    assert result.returncode == 0 and "could not be checked" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["judge_errors"] == 3 and report["kept"] == 0 and report["checks"]["judge"]["errors"] == 3
    assert report["tasks"]["t0"]["errors"] == 2
    healthy = fake_server(Scripted([], default=text_reply(GOOD)))
    result = tracegen("filter", str(source), "--out", str(out), "-q", *judge_args(healthy))
    assert result.returncode == 0 and len(healthy.requests) == 3
    assert json.loads((out / "report.json").read_text())["kept"] == 3


def many_samples(tmp_path: Path, n: int) -> Path:
    return write(tmp_path / "many.jsonl", [sample(i, 0, str(i + 10)) for i in range(n)])


@pytest.mark.parametrize("how", ["kill9", "sigint"])
def test_interrupt_loses_no_finished_verdict(fake_server: Start, tmp_path: Path, how: str) -> None:
    slow = fake_server(Scripted([], default=text_reply(GOOD, delay_s=0.15)))
    source = many_samples(tmp_path, 40)
    out = tmp_path / "f"
    args = ["filter", str(source), "--out", str(out), "-q", *judge_args(slow), "--judge-concurrency", "2"]
    proc = start_tracegen(*args)
    journal = out / "verdicts.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not journal.exists() or journal.read_text().count("\n") < 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL if how == "kill9" else signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    if how == "sigint":
        assert proc.returncode == 130 and "re-run the same command to resume" in err
    assert not (out / "kept.jsonl").exists() and not (out / "report.json").exists()  # nothing half-written
    if how == "kill9":  # a torn last line, as a crash mid-write leaves it, is repaired on resume
        with journal.open("a") as f:
            f.write('{"id": "t39-s0", "check": "ju')
    done = [json.loads(line) for line in journal.read_text().splitlines() if line.endswith("}")]
    assert 6 <= len(done) < 40
    fast = fake_server(Scripted([], default=text_reply(GOOD)))
    result = tracegen("filter", str(source), "--out", str(out), "-q", *judge_args(fast))
    assert result.returncode == 0, result.stderr
    assert len(fast.requests) == 40 - len(done)  # every finished verdict reused, none asked twice
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 40 and report["checks"]["judge"]["reused"] == len(done)


def test_filter_help_names_the_flags() -> None:
    result = tracegen("filter", "--help")
    assert result.returncode == 0
    for flag in ("--verifier", "--all-checks", "--selection", "--judge-base-url", "TRACEGEN_JUDGE_API_KEY"):
        assert flag in result.stdout, flag
    assert os.environ.get("TRACEGEN_TEACHER_API_KEY") == SECRET
