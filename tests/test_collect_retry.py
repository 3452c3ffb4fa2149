"""collect when the teacher fails: halt on endpoint errors, retry them on resume, --retry-errors, one writer."""

from __future__ import annotations

import json
import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tracegen.collect.driver import run_collect
from tracegen.errors import TracegenError
from tracegen.store import read_trajectories, writer_lock
from tracegen.testing.fake_server import FakeServer, ReactScript, Scripted, error_reply, text_reply

from .conftest import make_config, start_tracegen, tracegen, write_tasks

Start = Callable[[Any], FakeServer]


def _lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "trajectories.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_key_halts_at_once_then_the_error_is_sampled_again(fake_server: Start, tmp_path: Path) -> None:
    tasks, run = write_tasks(tmp_path / "t.jsonl", 4), tmp_path / "run"
    server = fake_server(Scripted([error_reply(401, "invalid api key")], default=text_reply("42")))
    summary = run_collect(make_config(server.base_url, tasks, concurrency=1), run, show_progress=False)
    assert len(server.requests) == 1 and summary.completed == 1, "the run stops at the first refused request"
    with pytest.raises(TracegenError, match=r"stopped at the first endpoint error: .*HTTP 401: invalid api key"):
        summary.check_errors(0.5, "fail_on_error")
    assert json.loads((run / "manifest.json").read_text())["status"] == "stopped"

    again = run_collect(make_config(server.base_url, tasks, concurrency=1), run, show_progress=False)
    assert again.retrying == 1 and again.already_done == 0 and again.completed == 4
    assert len(_lines(run)) == 5, "append-only: the error record stays in the file"
    kept = list(read_trajectories(run / "trajectories.jsonl"))
    assert len(kept) == 4 and {t.stop_reason for t in kept} == {"answer"}, "the retried record supersedes"


def test_unreachable_teacher_is_an_endpoint_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}/v1"
    # The preflight would refuse this run before any trajectory; off, this is the path of a teacher that
    # goes away during a run.
    teacher = {"max_attempts": 2, "preflight": False}
    config = make_config(url, write_tasks(tmp_path / "t.jsonl", 3), concurrency=1, teacher=teacher)
    summary = run_collect(config, tmp_path / "run", show_progress=False)
    assert summary.halted and "connection failed" in summary.halted
    assert (summary.completed, summary.requests, summary.retries) == (1, 2, 1)
    [first, *_] = _lines(tmp_path / "run")
    assert first["errors"][0]["kind"] == "endpoint"


def test_failed_requests_count_their_retries(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(Scripted([error_reply(503), error_reply(503)], default=text_reply("ok")))
    config = make_config(
        server.base_url, write_tasks(tmp_path / "t.jsonl", 2), concurrency=1, teacher={"max_attempts": 2}
    )
    summary = run_collect(config, tmp_path / "run", show_progress=False)
    assert summary.by_stop_reason == {"error": 1, "answer": 1}
    assert (summary.requests, summary.retries) == (3, 1)


def test_retry_errors_samples_other_errors_again_and_readers_see_one_record(fake_server: Start, tmp_path: Path) -> None:
    tasks, run = write_tasks(tmp_path / "t.jsonl", 3), tmp_path / "run"
    server = fake_server(Scripted([error_reply(400, "context length exceeded")], default=text_reply("ok")))
    config = make_config(server.base_url, tasks, concurrency=1)
    first = run_collect(config, run, show_progress=False)
    assert first.by_stop_reason == {"error": 1, "answer": 2} and first.halted is None
    assert run_collect(config, run, show_progress=False).completed == 0, "a teacher error is a sample: kept"
    again = run_collect(config, run, show_progress=False, retry_errors=True)
    assert again.retrying == 1 and again.completed == 1
    kept = list(read_trajectories(run / "trajectories.jsonl"))
    assert sorted(t.task.id for t in kept) == ["t0", "t1", "t2"] and all(t.stop_reason == "answer" for t in kept)

    proc = tracegen("filter", str(run), "--out", str(tmp_path / "f"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["trajectories"] == 3, "filter sees one record per (task, sample)"


def test_fail_on_error_names_the_first_cause(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(Scripted([], default=error_reply(400, "unsupported parameter: seed")))
    tasks = write_tasks(tmp_path / "t.jsonl", 2)
    proc = tracegen(
        "collect",
        "--tasks",
        str(tasks),
        "--out",
        str(tmp_path / "run"),
        "--teacher-base-url",
        server.base_url,
        "--teacher-model",
        "m",
        "-q",
    )
    assert proc.returncode == 1
    assert "the first: teacher m@" in proc.stderr and "unsupported parameter: seed" in proc.stderr


def test_a_second_writer_is_refused_with_the_first_ones_pid(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=1, latency_s=2.0))  # the first run lasts ~8 s
    tasks, run = write_tasks(tmp_path / "t.jsonl", 8), tmp_path / "run"
    args = ["collect", "--tasks", str(tasks), "--out", str(run), "--teacher-base-url", server.base_url,
            "--teacher-model", "m", "-c", "2", "-q"]  # fmt: skip
    first = start_tracegen(*args)
    try:
        deadline = time.monotonic() + 60
        while not (run / ".lock").exists() or not (run / ".lock").read_text().strip():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.05)
        second = tracegen(*args)
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert second.returncode == 1
    assert f"another tracegen process (pid {first.pid})" in second.stderr and "Traceback" not in second.stderr
    assert len(_lines(run)) == 8, "no pair written twice"


def test_full_disk_is_one_error_line_and_a_stopped_manifest(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(Scripted([], default=text_reply("the answer is " + "x" * 3000)))
    tasks, run = write_tasks(tmp_path / "t.jsonl", 10), tmp_path / "run"
    limit = 24_000  # above the manifest's size, below ten 3 kB records

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG

    proc = tracegen("collect", "--tasks", str(tasks), "--out", str(run), "--teacher-base-url", server.base_url,
                    "--teacher-model", "m", "-c", "1", "-q", preexec_fn=small_files)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: cannot write to ") and "Traceback" not in proc.stderr
    assert "hint:" in proc.stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    assert 0 < len(_lines(run)) < 10


@pytest.mark.parametrize("command", ["filter", "format"])
def test_filter_and_format_refuse_a_second_writer(fake_server: Start, tmp_path: Path, command: str) -> None:
    server = fake_server(Scripted([], default=text_reply("2")))
    run_collect(make_config(server.base_url, write_tasks(tmp_path / "t.jsonl", 1)), tmp_path / "run")
    out = tmp_path / command
    lock = out / ".lock" if command == "filter" else tmp_path / f".{command}.lock"
    extra = ["--tokenizer", "smollm2"] if command == "format" else []
    with writer_lock(lock, str(out)):  # this test process is the first writer
        proc = tracegen(command, str(tmp_path / "run"), "--out", str(out), *extra)
    assert proc.returncode == 1
    assert f"is being written by another tracegen process (pid {os.getpid()})" in proc.stderr
