"""tracegen eval: accuracy by reference, finish_reason per question, prompt wrapping, resume, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tracegen, write_tasks
from tracegen.config import EvalConfig
from tracegen.data.templates import PROOF_HEAD, PROOF_MID
from tracegen.evaluate import run_eval
from tracegen.testing.fake_server import FakeServer, Reply, text_reply


def answer_by_question(request: dict[str, Any]) -> Reply:
    """t0 right, t1 wrong, t2 cut off by the token wall (finish_reason=length)."""
    prompt = request["messages"][-1]["content"]
    i = int(re.search(r"What is (\d+) \+", prompt).group(1))  # type: ignore[union-attr]
    if i == 0:
        return text_reply("The answer is 0.", reasoning="0 + 0 = 0")
    if i == 1:
        return text_reply("The answer is 5.", reasoning="1 + 1 is surely 5")
    return text_reply("Let me think about 2 + 2, which", reasoning="long " * 20, finish_reason="length")


def eval_config(base_url: str, tasks: Path, **overrides: Any) -> EvalConfig:
    endpoint = {"base_url": base_url, "model": "student", "backoff_base_s": 0.01, **overrides.pop("endpoint", {})}
    return EvalConfig.model_validate({"tasks": str(tasks), "endpoint": endpoint, **overrides})


def test_eval_reports_accuracy_and_finish_reason_per_question(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "tasks.jsonl", 3)
    with FakeServer(answer_by_question) as server:
        result = tracegen(
            "eval", "--tasks", str(tasks), "--base-url", server.base_url, "--model", "student", "-q",
            "--out", str(tmp_path / "eval"),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        body = server.requests[0]
    # Thinking-on eval defaults, as the agentic card measured.
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.6, 0.95, 32768)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    totals = report["totals"]
    assert (totals["answers"], totals["scored"], totals["correct"]) == (3, 3, 1)
    assert totals["accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert totals["converged"] == pytest.approx(2 / 3, abs=1e-3)
    assert totals["hit_length"] == pytest.approx(1 / 3, abs=1e-3)
    rows = {r["task_id"]: r for r in report["answers"]}
    assert [rows[t]["finish_reason"] for t in ("t0", "t1", "t2")] == ["stop", "stop", "length"]
    assert [rows[t]["correct"] for t in ("t0", "t1", "t2")] == [True, False, False]
    assert rows["t1"]["checks"]["reference"].startswith("numeric")
    assert rows["t2"]["stop_reason"] == "length"
    # The table names each question's finish_reason, and the totals line the two shares.
    assert re.search(r"t2 .* length", result.stdout)
    assert "accuracy 33.3% (1/3)" in result.stdout
    assert "hit the token wall (length) 33.3%" in result.stdout
    assert (tmp_path / "eval" / "trajectories.jsonl").is_file()


def test_eval_wraps_prompts_in_a_training_template_without_system_turn_or_tools(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "tasks.jsonl", 1)
    with FakeServer(answer_by_question) as server:
        config = eval_config(server.base_url, tasks, prompt_template="proof", system_prompt="", tools=[])
        summary = run_eval(config, tmp_path / "eval", show_progress=False)
        body = server.requests[0]
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert body["messages"][0]["content"] == PROOF_HEAD + "What is 0 + 0?" + PROOF_MID
    assert "tools" not in body
    assert summary.totals()["correct"] == 1


def test_eval_resumes_without_asking_again_and_refuses_changed_settings(tmp_path: Path) -> None:
    tasks = write_tasks(tmp_path / "tasks.jsonl", 3)
    out = tmp_path / "eval"
    with FakeServer(answer_by_question) as server:
        run_eval(eval_config(server.base_url, tasks), out, show_progress=False)
        asked = len(server.requests)
        again = run_eval(eval_config(server.base_url, tasks), out, show_progress=False)
        assert len(server.requests) == asked  # every answer reused
        assert again.totals()["correct"] == 1
        before = (out / "eval.json").read_text()
        result = tracegen(
            "eval", "--tasks", str(tasks), "--base-url", server.base_url, "--model", "student", "-q",
            "--prompt-template", "proof", "--out", str(out),
        )  # fmt: skip
    assert result.returncode == 2
    assert "evaluated with different settings" in result.stderr
    assert (out / "eval.json").read_text() == before


def test_eval_tasks_without_reference_are_not_scored(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "open", "prompt": "What is 0 + 0? Explain."}) + "\n")
    with FakeServer(answer_by_question) as server:
        summary = run_eval(eval_config(server.base_url, tasks), tmp_path / "eval", show_progress=False)
    totals = summary.totals()
    assert (totals["scored"], totals["accuracy"], totals["converged"]) == (0, None, 1.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--base-url", "http://127.0.0.1:9/v1"], "no model to evaluate"),
        (["--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--samples", "0"], "eval.samples"),
    ],
)
def test_eval_bad_input_exits_2_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    tasks = write_tasks(tmp_path / "tasks.jsonl", 1)
    result = tracegen("eval", "--tasks", str(tasks), "--out", str(tmp_path / "eval"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_eval_of_the_quickstart_section_against_a_served_smollm2(tmp_path: Path) -> None:
    """The quickstart recipe's eval section, offline, on a real model behind `transformers serve`."""
    from tracegen.serve import prepare_smollm2, serve

    recipe = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
    with serve(prepare_smollm2()) as served:
        result = tracegen(
            "eval", "--recipe", str(recipe), "--base-url", served.base_url, "--model", served.model, "-q",
            "--out", str(tmp_path / "eval"),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["totals"]["answers"] == report["totals"]["scored"] == 4
    assert sum(report["totals"]["by_finish_reason"].values()) == 4
    assert set(report["totals"]["by_finish_reason"]) <= {"stop", "length"}
    assert all(r["answer"] or r["finish_reason"] == "length" for r in report["answers"])
    assert "eval-1" in result.stdout and "converged (finish_reason=stop)" in result.stdout


def test_eval_fails_past_its_error_limit_before_writing_a_report(tmp_path: Path) -> None:
    from tracegen.errors import TracegenError
    from tracegen.testing.fake_server import Scripted, error_reply

    tasks = write_tasks(tmp_path / "tasks.jsonl", 2)
    with FakeServer(Scripted([], default=error_reply(500))) as server:
        config = eval_config(server.base_url, tasks, fail_on_error=0.5, endpoint={"max_attempts": 1})
        with pytest.raises(TracegenError, match=r"2 of 2 trajectories ended in error .* eval.fail_on_error 50%"):
            run_eval(config, tmp_path / "eval", show_progress=False)
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_eval_counts_markers_empty_answers_parse_failures_and_length_percentiles(tmp_path: Path) -> None:
    from tracegen.testing.fake_server import tool_call_reply

    def reply(request: dict[str, Any]) -> Reply:
        i = int(re.search(r"What is (\d+) \+", request["messages"][-1]["content"]).group(1))  # type: ignore[union-attr]
        if i == 0:
            return text_reply("0 + 0 adds nothing.\n\nFinal Answer:\n0")
        if i == 1:
            return text_reply("")  # an empty answer
        return tool_call_reply([("python", '{"code": "print(')])  # arguments that do not parse

    tasks = write_tasks(tmp_path / "tasks.jsonl", 3)
    config = eval_config("", tasks, require_markers=["Final Answer:"], max_turns=1, tools=["python"])
    with FakeServer(reply) as server:
        config.endpoint.base_url = server.base_url
        summary = run_eval(config, tmp_path / "eval", show_progress=False)
    totals = summary.totals()
    assert (totals["with_markers"], totals["empty_answers"], totals["parse_fail"]) == (1, 2, 1)
    rows = {r.task_id: r for r in summary.rows}
    assert rows["t0"].markers_missing == [] and rows["t1"].markers_missing == ["Final Answer:"]
    tokens = sorted(r.completion_tokens for r in summary.rows)
    assert totals["median_completion_tokens"] == tokens[1]
    assert totals["p90_completion_tokens"] == pytest.approx(tokens[1] + 0.8 * (tokens[2] - tokens[1]), abs=0.05)


def test_eval_compares_several_models_served_the_same_way(tmp_path: Path) -> None:
    def by_model(request: dict[str, Any]) -> Reply:  # the base model is wrong, the distilled one right
        i = int(re.search(r"What is (\d+) \+", request["messages"][-1]["content"]).group(1))  # type: ignore[union-attr]
        return text_reply(f"The answer is {i + i if request['model'] == 'org/merged' else 7}.")

    tasks = write_tasks(tmp_path / "tasks.jsonl", 2)
    with FakeServer(by_model) as server:
        result = tracegen(
            "eval", "--tasks", str(tasks), "--base-url", server.base_url, "--model", "base", "--model", "org/merged",
            "-q", "--out", str(tmp_path / "eval"),
        )  # fmt: skip
        asked = {r["model"] for r in server.requests}
    assert result.returncode == 0, result.stderr
    assert asked == {"base", "org/merged"}
    assert json.loads((tmp_path / "eval" / "base" / "eval.json").read_text())["totals"]["accuracy"] == 0.0
    assert json.loads((tmp_path / "eval" / "org_merged" / "eval.json").read_text())["totals"]["accuracy"] == 1.0
    compared = json.loads((tmp_path / "eval" / "compare.json").read_text())
    assert compared["models"] == ["base", "org/merged"] and compared["metrics"]["accuracy"] == [0.0, 1.0]
    assert compared["difference"]["accuracy"] == [1.0]
    assert re.search(r"accuracy\s.*0\s.*1\s.*\+1", " ".join(result.stdout.split()))


def test_multiple_choice_tasks_with_k_shot_are_scored_by_letter(tmp_path: Path) -> None:
    from tracegen.collect.tasks import load_tasks
    from tracegen.config import TaskColumns

    sample = Path(__file__).parent.parent / "recipes" / "tasks" / "mc-sample.jsonl"
    columns = TaskColumns(prompt="question", reference="answer", choices="choices", shots=1)
    tasks = load_tasks(sample, columns)
    assert [t.id for t in tasks] == ["mc-1", "mc-2", "mc-3"]  # mc-0 is the worked example
    assert [t.reference for t in tasks] == ["A", "C", "D"]  # letters, from letters or 0-based indices
    assert tasks[0].prompt.startswith("Which particle carries the electromagnetic force?\nA. Gluon\nB. Photon")
    assert "Answer: B\n\nWhat is the derivative of sin(x)?\nA. cos(x)" in tasks[0].prompt
    assert tasks[0].prompt.endswith("D. -sin(x)\nAnswer with the letter of the correct option.")

    def answer(request: dict[str, Any]) -> Reply:  # always C: right only on mc-2
        return text_reply("The answer is C.")

    config = eval_config("", sample, task_columns=columns.model_dump(), tools=[], max_turns=1)
    with FakeServer(answer) as server:
        config.endpoint.base_url = server.base_url
        totals = run_eval(config, tmp_path / "eval", show_progress=False).totals()
    assert (totals["answers"], totals["correct"]) == (3, 1)


def test_multiple_choice_answer_out_of_range_names_the_row(tmp_path: Path) -> None:
    from tracegen.collect.tasks import load_tasks
    from tracegen.config import TaskColumns
    from tracegen.errors import BadInputError

    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "Q?", "choices": ["a", "b"], "reference": 5}) + "\n")
    with pytest.raises(BadInputError, match=r"mc.jsonl:1: the answer 5 is neither an option letter"):
        load_tasks(bad, TaskColumns(choices="choices"))


def test_task_language_is_read_and_an_unknown_one_names_the_row(tmp_path: Path) -> None:
    from tracegen.collect.tasks import load_tasks
    from tracegen.config import TaskColumns
    from tracegen.errors import BadInputError

    shipped = Path(__file__).parent.parent / "recipes" / "tasks"
    assert {t.language for t in load_tasks(shipped / "code-javascript.jsonl", TaskColumns())} == {"javascript"}
    assert {t.language for t in load_tasks(shipped / "code-bash.jsonl", TaskColumns())} == {"bash"}
    assert {t.language for t in load_tasks(shipped / "agentic-smoke.jsonl", TaskColumns())} == {"python"}  # absent
    bad = tmp_path / "tasks.jsonl"
    rows = [{"id": "a", "prompt": "p", "tests": "t"}, {"id": "b", "prompt": "p", "tests": "t", "lang": "ruby"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadInputError, match=r"tasks.jsonl:2: field 'lang' is 'ruby', not one of python, javascript"):
        load_tasks(bad, TaskColumns(language="lang"))
