"""The LLM judge against a real loopback OpenAI-compatible server: JSON verdicts, re-asks, refusals, 429s, votes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from tracegen.checks.judge import JUDGE_ERROR, Judge, parse_reply
from tracegen.config import JudgeConfig
from tracegen.records import Verdict
from tracegen.testing.fake_server import FakeServer, Script, Scripted, error_reply, text_reply
from tracegen.testing.synthetic import make_trajectory

from .conftest import SECRET

Start = Callable[[Script], FakeServer]


def good(verdict: str = "pass", score: float = 0.9, rationale: str = "The answer 3 is right.") -> str:
    return json.dumps({"verdict": verdict, "score": score, "rationale": rationale})


def judge_config(server: FakeServer, **overrides: Any) -> JudgeConfig:
    settings: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "judge-m",
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_attempts": 3,
    }
    settings.update(overrides)
    return JudgeConfig(**settings)


def run_judge(config: JudgeConfig) -> Verdict:
    async def body() -> Verdict:
        judge = Judge(config)
        try:
            return await judge.judge(make_trajectory(1))
        finally:
            await judge.aclose()

    return asyncio.run(body())


def test_good_json_verdict_is_stored_with_rationale_model_and_usage(fake_server: Start) -> None:
    server = fake_server(Scripted([text_reply(good(), reasoning="let me grade")]))
    verdict = run_judge(judge_config(server))
    assert verdict.check == "judge" and verdict.passed and verdict.score == 0.9
    assert verdict.reason == "The answer 3 is right." and verdict.judge_model == "judge-m"
    assert verdict.usage is not None and verdict.usage.completion_tokens > 0
    (request,) = server.requests
    assert request["model"] == "judge-m" and request["temperature"] == 0.0
    user = request["messages"][1]["content"]
    assert "# Rubric" in user and "# Reference answer\n3" in user and "[final answer]\nThe answer is 3." in user
    assert SECRET not in verdict.model_dump_json()


def test_bad_json_then_good_is_reasked_once(fake_server: Start) -> None:
    server = fake_server(Scripted([text_reply('{"verdict": "pass", "score": 0.8,'), text_reply(good("fail", 0.2))]))
    verdict = run_judge(judge_config(server))
    assert not verdict.passed and verdict.score == 0.2 and not verdict.reason.startswith(JUDGE_ERROR)
    assert len(server.requests) == 2
    reask = server.requests[1]["messages"]
    assert reask[-2] == {"role": "assistant", "content": '{"verdict": "pass", "score": 0.8,'}
    assert "not a valid verdict (invalid JSON" in reask[-1]["content"]


def test_out_of_range_score_and_fenced_json() -> None:
    assert parse_reply("```json\n" + good() + "\n```")[0] is not None
    reply, problem = parse_reply(json.dumps({"verdict": "PASS", "score": 7, "rationale": "x"}))
    assert reply is None and problem is not None and problem.startswith("score:")
    assert parse_reply(json.dumps({"verdict": "maybe", "score": 0.5, "rationale": "x"}))[1]
    assert parse_reply(good("Pass"))[0] is not None  # case-insensitive verdict


def test_refusal_becomes_judge_error_after_bounded_reasks(fake_server: Start) -> None:
    refusal = "I'm sorry, but I can't help with grading this."
    server = fake_server(Scripted([], default=text_reply(refusal)))
    verdict = run_judge(judge_config(server, max_reasks=2))
    assert not verdict.passed and verdict.reason.startswith(JUDGE_ERROR)
    assert "invalid verdict after 2 re-ask(s): no JSON object" in verdict.reason
    assert len(server.requests) == 3  # the question and two re-asks, then it gives up


def test_429_is_retried_then_judged(fake_server: Start) -> None:
    server = fake_server(Scripted([error_reply(429, "slow down", retry_after=0), text_reply(good())]))
    verdict = run_judge(judge_config(server))
    assert verdict.passed and len(server.requests) == 2


def test_api_failing_after_retries_is_a_judge_error_not_a_crash(fake_server: Start) -> None:
    server = fake_server(Scripted([], default=error_reply(503, "overloaded")))
    verdict = run_judge(judge_config(server, max_attempts=2))
    assert verdict.reason.startswith(JUDGE_ERROR) and "HTTP 503" in verdict.reason
    assert SECRET not in verdict.reason
    assert len(server.requests) == 2


def test_majority_vote_over_samples(fake_server: Start) -> None:
    server = fake_server(Scripted([text_reply(good("pass", 1.0)), text_reply(good("fail", 0.1)), text_reply(good())]))
    verdict = run_judge(judge_config(server, samples=3, temperature=0.7))
    assert verdict.passed and verdict.reason.endswith("(vote 2/3 pass)")
    assert verdict.score is not None and abs(verdict.score - (1.0 + 0.1 + 0.9) / 3) < 1e-3
    # a tie among valid replies fails; too few valid replies is an error
    tie = fake_server(Scripted([text_reply(good("pass")), text_reply(good("fail"))]))
    assert not run_judge(judge_config(tie, samples=2)).passed
    broken = fake_server(Scripted([text_reply(good())], default=text_reply("no idea")))
    verdict = run_judge(judge_config(broken, samples=3, max_reasks=0))
    assert verdict.reason.startswith(JUDGE_ERROR) and "1 of 3 judge replies valid" in verdict.reason


def test_pass_score_threshold(fake_server: Start) -> None:
    server = fake_server(Scripted([text_reply(good("pass", 0.4))]))
    verdict = run_judge(judge_config(server, pass_score=0.5))
    assert not verdict.passed and verdict.score == 0.4
