"""How format runs: pipelined batches, worker processes, and the exact shortcuts of the tokenization hot path."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import time
import unicodedata
from pathlib import Path
from typing import Any

import pytest

from tracegen.config import FormatConfig
from tracegen.data import chat_template as chat_template_module
from tracegen.data.chat_template import WRITTEN_FOR, PublicTemplate, compile_template, memo_supported
from tracegen.data.format import format_dataset
from tracegen.data.templates import MaskPolicy, Piece, Rendered, compile_chat_template, render_chat
from tracegen.data.tokenize import Stats, assemble, encode, lay_out, load_tokenizer
from tracegen.errors import BadInputError, TracegenError
from tracegen.testing.synthetic import HOSTILE, make_trajectory, write_trajectories

from .conftest import start_tracegen, tracegen

TEXTS = [
    "  leading\n\n\ttabs  and   spaces  ",
    "x = 1;\r\n  y=2\n",
    "café naïve résumé",
    "e\u0301 decomposed accent (not NFC)",
    "\u212b angstrom sign (NFC changes it)",
    "emoji 🙂 mixed ünïcode 𝔘𝔫𝔦",
    "数学数学∑∑ 漢字かな",
    "\U0001f468\u200d\U0001f469 family",
    "   ",
    "\n",
    HOSTILE,
]


@pytest.mark.parametrize(
    ("tok_spec", "byte_path"),
    [("qwen3", True), ("smollm2", True), ("qwen3", False)],
    ids=["qwen3", "smollm2", "fallback"],
)
def test_run_offsets_equal_the_tokenizers_own(tok_spec: str, byte_path: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte-length offsets and the NFC shortcut give exactly the tokenizer's ids and character offsets.

    ``fallback``: when byte lengths do not add up, the runs are encoded again with offsets.
    """
    if not byte_path:
        from tracegen.data import tokenize as render_module

        monkeypatch.setattr(render_module, "_runs_from_bytes", lambda *args: False)
    tok = load_tokenizer(tok_spec)
    texts = list(TEXTS)
    for i in range(40):
        t = make_trajectory(i, turns=3, words=30)
        texts += [m.content for m in t.messages if m.content]
    texts = list(dict.fromkeys(texts))
    tok.run_cache.clear()
    batch = lay_out([Rendered(str(k), "chat", [Piece(t, "prompt", False)]) for k, t in enumerate(texts)], tok)
    encode(batch)
    assemble(batch, tok, None, Stats())
    for text in texts:
        text = unicodedata.normalize("NFC", text) if tok.unicode_form == "NFC" else text  # as lay_out puts it
        expected = tok.plain.encode(text, add_special_tokens=False)
        ids, offsets = tok.run_cache[text]
        assert ids.tolist() == expected.ids, text
        assert offsets.tolist() == [list(o) for o in expected.offsets], text


def _dataset_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_any_number_of_workers_writes_the_same_bytes(tmp_path: Path) -> None:
    """Several worker processes and small pipelined batches change nothing in the dataset folder."""
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 30, source="mixed", hostile=True)
    folders = []
    for workers, batch_size in ((1, 256), (1, 4), (3, 4)):
        out = tmp_path / f"w{workers}-b{batch_size}" / "dataset"  # one folder name: the card names it
        config = FormatConfig(template="chat", tokenizer="qwen3", workers=workers, batch_size=batch_size)
        result = format_dataset(src, out, config)
        assert result.stats.samples == 30
        folders.append(_dataset_bytes(out))
    assert folders[0] == folders[1] == folders[2]


def _die(bounds: tuple[int, int]) -> None:
    os._exit(9)  # a worker killed mid-range (the OOM killer, kill -9)


def test_a_dead_worker_fails_the_run_instead_of_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracegen.data.format as format_module

    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 8)
    monkeypatch.setattr(format_module, "_format_range", _die)
    out = tmp_path / "ds"
    with pytest.raises(TracegenError, match="worker process died"):
        format_dataset(src, out, FormatConfig(template="chat", tokenizer="qwen3", workers=2, batch_size=2))
    assert not out.exists()


def test_bad_input_in_a_worker_keeps_its_message_and_exit_code(tmp_path: Path) -> None:
    """An error raised inside a worker reaches the user as if raised in-process: one line, exit 2."""
    src = tmp_path / "t.jsonl"
    trajs = [make_trajectory(i) for i in range(6)]
    trajs[5].messages[1].content += "\ue000"  # the private-use sentinel render_chat refuses
    src.write_text("".join(t.model_dump_json() + "\n" for t in trajs))
    out = tmp_path / "ds"
    with pytest.raises(BadInputError, match="U\\+E000"):
        format_dataset(src, out, FormatConfig(template="chat", tokenizer="qwen3", workers=2, batch_size=2))
    assert gc.isenabled(), "format pauses the cycle collector while it runs, and must turn it back on"
    r = tracegen("format", str(src), "--out", str(out), "--tokenizer", "qwen3", "--workers", "2")
    assert r.returncode == 2 and "U+E000" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def _outcome(template: Any) -> tuple[str, str]:
    try:
        return "ok", str(template.render(message={"a": 1}))
    except Exception as exc:  # noqa: BLE001 - the outcome is the exception's type
        return type(exc).__name__, ""


@pytest.mark.parametrize("memo", [True, False], ids=["memo", "public"])
def test_memoised_sandbox_still_refuses_what_the_sandbox_refuses(memo: bool) -> None:
    """Memoising the attribute checks never hands out what Jinja's sandbox would not; nor does the public path."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = compile_template(
        "{{ message.content.upper() }}|{{ message.items() | list | length }}|{{ ''.__class__ }}|{{ message.mro }}",
        memo,
    )
    assert isinstance(template, PublicTemplate) is not memo
    out = template.render(message={"content": "hi", "mro": "key"})
    assert out.startswith("HI|2||")  # the dunder is refused (empty), a dict key named like a type method works
    assert out.endswith("key")
    # each one as Jinja's own sandbox does it: refused (SecurityError, UndefinedError) or rendered empty
    sandbox = ImmutableSandboxedEnvironment()
    unsafe = (
        "{{ ''.__class__.__mro__ }}",
        "{{ [].append(1) }}",
        "{{ message.clear() }}",
        "{{ message.update({'x': 1}) }}",
        "{{ ''.format.__globals__ }}",
        "{{ (message.items() | list)[0].__class__.__subclasses__() }}",
        "{{ message.a.__class__.__base__ }}",
        "{% set ns = namespace() %}{{ ns.__init__.__globals__ }}",
    )
    for source in unsafe:
        expected = _outcome(sandbox.from_string(source))
        assert expected in (("SecurityError", ""), ("UndefinedError", ""), ("ok", "")), (source, expected)
        for _ in range(2):  # twice: the second call goes through the memoised path
            assert _outcome(compile_template(source, memo)) == expected, source
    # a string attribute approved once stays a fresh value per object
    values = compile_template("{% for s in xs %}{{ s.upper() }}{% endfor %}", memo).render(xs=["a", "b"])
    assert values == "AB"


def test_the_memo_is_used_only_with_the_transformers_it_was_written_for() -> None:
    import transformers

    assert memo_supported(WRITTEN_FOR + ".0") and memo_supported(WRITTEN_FOR + ".3")
    assert not memo_supported("4.57.1") and not memo_supported("5.99.0") and not memo_supported(None)
    assert memo_supported(transformers.__version__) == chat_template_module.MEMO


@pytest.mark.parametrize("tok_spec", ["qwen3", "smollm2"])
def test_the_public_path_renders_the_same_text(tok_spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback on another transformers writes exactly what the memoised template writes."""
    tok = load_tokenizer(tok_spec)
    assert tok.chat_template is not None
    trajectories = [make_trajectory(i, turns=3, hostile=i % 2 == 0) for i in range(4)]
    texts = {}
    for memo in (True, False):
        monkeypatch.setattr(chat_template_module, "MEMO", memo)
        chat = compile_chat_template(tok.chat_template, tok.special_map, tok.eos)
        # SmolLM2's template renders no tools or reasoning: allowed here, the point is equal text both ways.
        allowed = frozenset({"reasoning", "tool_calls"})
        texts[memo] = [render_chat(t, MaskPolicy(), chat, allowed).text for t in trajectories]
    assert texts[True] == texts[False]


def test_ctrl_c_stops_the_workers_and_writes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 10_000, turns=4, words=60)
    out = tmp_path / "ds"
    proc = start_tracegen("format", str(src), "--out", str(out), "--tokenizer", "qwen3", "--workers", "2")
    time.sleep(5)  # loading takes about 2 s, formatting 10,000 conversations several more
    assert proc.poll() is None, "format finished before the interrupt: make the input larger"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrupted: nothing written" in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    # no worker left behind (forked workers carry the parent's command line)
    assert subprocess.run(["pgrep", "-f", str(src)], capture_output=True, text=True).stdout.split() == []
