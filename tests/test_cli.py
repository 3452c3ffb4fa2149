"""The command line as users drive it: real subprocesses, exit codes, stderr/stdout, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tracegen.testing.fake_server import FakeServer, ReactScript

from .conftest import SECRET, start_tracegen, tracegen, write_tasks

ROOT = Path(__file__).parent.parent
Start = Callable[[Any], FakeServer]


def test_help_is_fast_and_imports_no_heavy_library() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); sys.argv = ['tracegen', '--help']\n"
        "from tracegen.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'openai', 'docker') if m in sys.modules]\n"
        "print('ELAPSED', time.perf_counter() - t, 'HEAVY', heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "collect" in out
    line = out.strip().splitlines()[-1]
    assert line.endswith("HEAVY []"), line
    assert float(line.split()[1]) < 1.0
    started = time.perf_counter()
    assert tracegen("--help").returncode == 0
    assert time.perf_counter() - started < 2.0  # whole process, interpreter start-up included


def test_every_subcommand_has_help() -> None:
    result = tracegen("collect", "--help")
    assert (
        result.returncode == 0 and "--teacher-base-url" in result.stdout and "TRACEGEN_TEACHER_API_KEY" in result.stdout
    )


def test_cli_collect_prints_summary_and_writes_the_run(fake_server: Start, tmp_path: Path) -> None:
    server = fake_server(ReactScript(turns=2, latency_s=0.0))
    tasks = write_tasks(tmp_path / "t.jsonl", 2)
    result = tracegen(
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
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"stop_reason=answer\s+│\s+2 │", result.stdout), result.stdout
    assert len((tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()) == 2


def test_bad_recipe_exits_2_with_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("collect:\n  teacher:\n    modle: x\n")
    result = tracegen("collect", "--recipe", str(recipe), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"Error: {recipe}:3: unknown key 'collect.teacher.modle'")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_missing_teacher_is_bad_input(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACEGEN_TEACHER_") or k.endswith("API_KEY")}
    result = tracegen(
        "collect", "--tasks", str(write_tasks(tmp_path / "t.jsonl")), "--out", str(tmp_path / "r"), env=env
    )
    assert result.returncode == 2 and "no teacher base url configured" in result.stderr
    assert "--teacher-base-url" in result.stderr


def test_unreachable_teacher_fails_with_exit_1_and_no_secret(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "t.jsonl", 2)
    recipe = tmp_path / "fast-retries.yaml"
    recipe.write_text("collect:\n  teacher:\n    max_attempts: 3\n    backoff_base_s: 0.01\n")
    result = tracegen(
        "collect",
        "--recipe",
        str(recipe),
        "--tasks",
        str(tasks),
        "--out",
        str(tmp_path / "run"),
        "-q",
        "--teacher-base-url",
        "http://127.0.0.1:9/v1",
        "--teacher-model",
        "m",
        env={**os.environ, "TRACEGEN_TEACHER_API_KEY": SECRET},
    )
    assert result.returncode == 1
    # the preflight fails in seconds, before any trajectory (was: every task retried, then an error rate)
    assert "Error: cannot reach teacher m@127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout
    written = list((tmp_path / "run").glob("*")) if (tmp_path / "run").exists() else []
    assert not any(p.name == "trajectories.jsonl" for p in written)
    for path in written:
        assert SECRET not in path.read_text()


def test_ctrl_c_stops_cleanly_with_exit_130_and_resumes(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "t.jsonl", 40)
    with FakeServer(ReactScript(turns=2, latency_s=0.2)) as server:
        args = [
            "collect",
            "--tasks",
            str(tasks),
            "--out",
            str(tmp_path / "run"),
            "-c",
            "4",
            "-q",
            "--teacher-base-url",
            server.base_url,
            "--teacher-model",
            "m",
        ]
        proc = start_tracegen(*args)
        out_file = tmp_path / "run" / "trajectories.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out_file.exists() or len(out_file.read_text().splitlines()) < 4):
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "re-run the same command to resume" in stderr
        manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        saved = len(out_file.read_text().splitlines())
        assert 4 <= saved < 40
        resumed = tracegen(*args)
        assert resumed.returncode == 0, resumed.stderr
        ids = [json.loads(line)["id"] for line in out_file.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == 40


@pytest.mark.slow
def test_kill_9_at_several_points_loses_nothing_completed(tmp_path: Path) -> None:
    """SIGKILL a running collect repeatedly; the final file has every (task, sample) exactly once."""
    tasks = write_tasks(tmp_path / "t.jsonl", 30)
    out_file = tmp_path / "run" / "trajectories.jsonl"
    with FakeServer(ReactScript(turns=2, latency_s=0.05), record=False) as server:
        args = [
            sys.executable,
            str(ROOT / "cli.py"),
            "collect",
            "--tasks",
            str(tasks),
            "--out",
            str(tmp_path / "run"),
            "-k",
            "2",
            "-c",
            "8",
            "-q",
            "--teacher-base-url",
            server.base_url,
            "--teacher-model",
            "m",
        ]
        counts = []
        for wait_for in (1, 9, 25, 41):
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if out_file.exists() and out_file.stat().st_size and out_file.read_bytes().count(b"\n") >= wait_for:
                    break
                time.sleep(0.005)
            proc.kill()
            proc.wait()
            counts.append(out_file.read_bytes().count(b"\n"))
        assert counts == sorted(counts) and counts[-1] < 60, counts  # killed mid-run each time
        final = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
    lines = out_file.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is valid JSON
    pairs = sorted((r["task"]["id"], r["sample_index"]) for r in records)
    assert pairs == sorted((f"t{i}", k) for i in range(30) for k in range(2))


def test_unknown_option_is_bad_usage_exit_2_without_a_traceback() -> None:
    result = tracegen("collect", "--bogus")
    assert result.returncode == 2
    assert "No such option: --bogus" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_in_a_command_without_its_own_stop_says_interrupted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Typer would turn the KeyboardInterrupt into a silent exit 130; the user gets one line."""
    from tracegen import cli
    from tracegen.data import audit

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(audit, "run_audit", interrupted)
    monkeypatch.setattr(sys, "argv", ["tracegen", "audit", str(tmp_path)])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err.strip() == "Interrupted."
