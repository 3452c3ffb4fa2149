"""KD from an API teacher: a teacher cache from the top log-probs collect stored, aligned to the dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tracegen
from tracegen.distill.api_cache import entry
from tracegen.distill.cache import TeacherCache
from tracegen.distill.data import load_rows
from tracegen.distill.losses import TeacherTopK, sparse_kd_per_token
from tracegen.records import AssistantMessage, TokenLogprob, TopLogprob, Trajectory
from tracegen.testing.synthetic import make_trajectory

ALTERNATIVES = 3  # top alternatives the fake API returned per token


def with_logprobs(t: Trajectory, tokenizer: object, vocab: list[bytes]) -> Trajectory:
    """The trajectory as a server returning logprobs would have recorded it: every generated token with a
    log-prob of -0.1 and ALTERNATIVES alternatives (the token itself first)."""

    def tokens(text: str) -> list[TokenLogprob]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        out = []
        for i in ids:
            alts = [i, (i + 1) % len(vocab), (i + 7) % len(vocab)][:ALTERNATIVES]
            out.append(
                TokenLogprob(
                    token=vocab[i].decode("utf-8", "replace"),
                    logprob=-0.1,
                    bytes=list(vocab[i]),
                    top=[
                        TopLogprob(token=vocab[a].decode("utf-8", "replace"), logprob=lp, bytes=list(vocab[a]))
                        for a, lp in zip(alts, (-0.1, -2.5, -4.0), strict=True)
                    ],
                )
            )
        return out

    messages = []
    for m in t.messages:
        if isinstance(m, AssistantMessage):
            m = m.model_copy(
                update={
                    "reasoning_logprobs": tokens(m.reasoning) if m.reasoning else None,
                    "content_logprobs": tokens(m.content) if m.content else None,
                }
            )
        messages.append(m)
    return t.model_copy(update={"messages": messages})


@pytest.fixture(scope="module")
def qwen3() -> tuple[object, list[bytes]]:
    from transformers import AutoTokenizer

    from tracegen.data.token_bytes import byte_table
    from tracegen.data.tokenize import load_tokenizer, resolve_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(str(resolve_tokenizer_dir("qwen3")))
    return tok, byte_table(load_tokenizer("qwen3")).pieces


def test_entry_lists_the_sampled_token_and_tempers_the_tail_as_one_bucket() -> None:
    token = TokenLogprob(
        token="b",
        logprob=math.log(0.5),
        bytes=[98],
        top=[
            TopLogprob(token="a", logprob=math.log(0.3), bytes=[97]),
            TopLogprob(token="b", logprob=math.log(0.5), bytes=[98]),
            TopLogprob(token="?", logprob=-1.0, bytes=[255, 255]),  # not in the vocabulary: joins the tail
        ],
    )
    ids, logprobs, lse_t = entry(token, target=2, vocab_ids={b"a": 1, b"b": 2}, k=4, temperature=2.0)
    assert ids == [2, 1, 2, 2] and logprobs[:2] == pytest.approx([math.log(0.5), math.log(0.3)])
    assert logprobs[2:] == [-math.inf, -math.inf]  # padding: the row's first id, no mass
    assert lse_t == pytest.approx(math.log(0.5**0.5 + 0.3**0.5 + 0.2**0.5))


def test_kd_on_padded_and_empty_entries() -> None:
    """Padding changes nothing; an entry with nothing listed (no teacher signal) has KD exactly 0, no gradient."""
    torch.manual_seed(0)
    student = torch.randn(1, 50).repeat(3, 1).requires_grad_(True)  # the same student row thrice
    ids = torch.tensor([[4, 9, 4, 4], [4, 9, 17, 30], [0, 0, 0, 0]])
    inf = -math.inf
    logprobs = torch.tensor([[-0.5, -1.5, inf, inf], [-0.5, -1.5, inf, inf], [inf, inf, inf, inf]])
    lse_t = torch.tensor([0.3, 0.3, 0.0])
    padded = TeacherTopK(ids, logprobs, torch.zeros(3), lse_t)
    kd = sparse_kd_per_token(student, padded, 2.0)
    values = kd.detach().tolist()
    assert values[0] == pytest.approx(values[1])  # padding ids, whatever they repeat, carry no mass
    short = TeacherTopK(ids[:1, :2], logprobs[:1, :2], torch.zeros(1), lse_t[:1])
    assert values[0] == pytest.approx(sparse_kd_per_token(student[:1], short, 2.0).detach().item(), rel=1e-6)
    assert values[2] == 0.0
    kd.sum().backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert torch.count_nonzero(student.grad[2]) == 0


@pytest.mark.slow
def test_api_logprobs_become_a_cache_that_trains(tmp_path: Path, qwen3: tuple[object, list[bytes]]) -> None:
    from tracegen.model_aliases import resolve_model

    tokenizer, vocab = qwen3
    trajectories = tmp_path / "kept.jsonl"
    trajectories.write_text(
        "".join(with_logprobs(make_trajectory(i), tokenizer, vocab).model_dump_json() + "\n" for i in range(6))
    )
    dataset, cache = tmp_path / "dataset", tmp_path / "cache"
    made = tracegen("format", str(trajectories), "--template", "proof", "--tokenizer", "qwen3", "--out", str(dataset))
    assert made.returncode == 0, made.stderr
    built = tracegen(
        "distill", "cache-teacher", str(dataset), "--from-logprobs", str(trajectories), "--tokenizer", "qwen3",
        "--out", str(cache), "--json",
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    summary = json.loads(built.stdout)
    # Reasoning and answer tokens line up; template text and inline tool-call renderings have no teacher.
    assert summary["top_k"] == ALTERNATIVES + 1 and 0.5 < summary["coverage"] < 1.0

    rows, teacher = load_rows(dataset), TeacherCache(cache)
    targets = [u for u in range(1, len(rows[0].labels)) if rows[0].labels[u] != -100]
    got = teacher.entries(0, len(targets))
    listed = [(ids, lps) for ids, lps in zip(got["ids"], got["logprobs"], strict=True) if math.isfinite(lps[0])]
    assert listed, "row 0 has aligned tokens"
    for u, ids, lps in zip(targets, got["ids"], got["logprobs"], strict=True):
        if math.isfinite(lps[0]):  # an aligned token: its sampled id first, the alternatives after
            assert ids[0] == rows[0].labels[u] and ids[1] == (ids[0] + 1) % len(vocab)
            assert lps[:3] == pytest.approx([-0.1, -2.5, -4.0], abs=1e-2)

    student = resolve_model("tiny:qwen3")
    trained = tracegen(
        "distill", str(dataset), "--student", student, "--teacher-cache", str(cache), "--out", str(tmp_path / "a"),
        "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--lora-alpha", "8",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["kd"]) and m["kd"] > 0 for m in steps)


@pytest.mark.slow
def test_api_cache_refuses_a_foreign_tokenizer_and_trajectories_without_logprobs(
    tmp_path: Path, qwen3: tuple[object, list[bytes]]
) -> None:
    from tests.distill_fixtures import save_model

    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(make_trajectory(i).model_dump_json() + "\n" for i in range(2)))
    dataset = tmp_path / "dataset"
    assert (
        tracegen("format", str(plain), "--template", "proof", "--tokenizer", "qwen3", "--out", str(dataset)).returncode
        == 0
    )
    args = ["distill", "cache-teacher", str(dataset), "--from-logprobs", str(plain), "--out", str(tmp_path / "c")]
    none = tracegen(*args, "--tokenizer", "qwen3")
    assert none.returncode == 2 and "no supervised token" in none.stderr
    foreign = tracegen(*args, "--tokenizer", str(save_model(tmp_path / "other")))
    assert foreign.returncode == 2 and "is not the one" in foreign.stderr
    assert not (tmp_path / "c" / "cache.json").exists()


def test_only_a_byte_level_vocabulary_gives_exact_token_bytes(tmp_path: Path) -> None:
    """API log-probs are aligned in bytes: only a GPT-2 style byte alphabet counts as byte-level (the API cache
    refuses any other vocabulary with exit 2), and its pieces are the exact bytes."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tracegen.data.token_bytes import byte_table
    from tracegen.data.tokenize import load_tokenizer

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "héllo": 1, "</s>": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert not byte_table(load_tokenizer(str(tmp_path))).byte_level
    qwen3 = byte_table(load_tokenizer("qwen3"))
    assert qwen3.byte_level and qwen3.pieces[load_tokenizer("qwen3").full.token_to_id("Ġhello")] == b" hello"
