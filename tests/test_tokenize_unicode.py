"""Unicode text the tokenizer would normalise: put in its form before spans, so decode(ids) == text holds."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest

from tracegen.data.templates import Piece, Rendered
from tracegen.data.tokenize import Stats, Tok, load_tokenizer, tokenize_batch, unicode_form

NFD = "Cafe\u0301 and \u212b"  # e + combining acute (macOS file names), the angstrom sign (NFC: U+00C5)
NFKC_ONLY = "\ufb01le \uff21 x\u00b2"  # the fi ligature, a fullwidth A, a superscript two: NFC keeps them
ZERO_WIDTH = "x\u200by\u200dz\ufeff"  # zero-width space / joiner, BOM: no normal form removes them


def _tokenizer(spec: str, tiny_tokenizer: Path, tmp_path: Path) -> Tok:
    """qwen3 and smollm2 as shipped; the fixture's tiny BPE as trained, or with a Unicode normaliser set."""
    if not spec.startswith("tiny"):
        return load_tokenizer(spec)
    folder = tmp_path / spec
    shutil.copytree(tiny_tokenizer, folder)
    form = spec.partition("-")[2].upper()
    if form:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        data["normalizer"] = {"type": form}
        (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return load_tokenizer(str(folder))


def _sample(answer: str, tok: Tok, prompt: str = f"Rename {NFD}?") -> Rendered:
    return Rendered(
        "s",
        "chat",
        [
            Piece("<|im_start|>user\n", "template", False, control_ok=True),
            Piece(prompt, "prompt", False),
            Piece("<|im_end|>\n<|im_start|>assistant\n", "template", False, control_ok=True),
            Piece(answer, "answer", True),
            Piece(tok.eos, "template", True, eos=True),
        ],
    )


@pytest.mark.parametrize(
    ("spec", "form"),
    [("qwen3", "NFC"), ("smollm2", None), ("tiny", None), ("tiny-nfkc", "NFKC"), ("tiny-nfd", "NFD")],
)
def test_text_is_put_in_the_tokenizers_form_before_spans(
    spec: str, form: str | None, tiny_tokenizer: Path, tmp_path: Path
) -> None:
    tok = _tokenizer(spec, tiny_tokenizer, tmp_path)
    assert tok.unicode_form == form
    answer = f"{NFD}, {NFKC_ONLY}, {ZERO_WIDTH}"
    stats = Stats()
    rows = tokenize_batch([_sample(answer, tok), _sample("plain ascii", tok, "plain")], tok, None, stats)
    row, plain = rows
    assert row is not None and plain is not None
    original = _sample(answer, tok).text
    expected = unicodedata.normalize(form, original) if form else original  # type: ignore[arg-type]
    assert row["text"] == expected
    assert tok.decode(row["input_ids"]) == row["text"]  # the audit's invariant 4
    trained = [sp for sp in row["spans"] if sp.kind == "answer"]
    assert len(trained) == 1
    written = row["text"][trained[0].start : trained[0].end]
    assert written == (unicodedata.normalize(form, answer) if form else answer)  # type: ignore[arg-type]
    assert ZERO_WIDTH.rstrip("\ufeff") in written and "\ufeff" in written
    if form == "NFC":  # Qwen's NFC keeps what only NFKC changes
        assert NFKC_ONLY in written
    changed = expected != original
    assert changed == (form is not None)  # every form changes one of NFD / NFKC_ONLY
    assert row["normalised"] == (form if changed else None)
    assert plain["normalised"] is None
    assert stats.normalised == int(changed)


def test_unicode_form_reads_sequences() -> None:
    assert unicode_form({"type": "NFC"}) == "NFC"
    assert unicode_form({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "_"}, {"type": "NFKC"}]})
    assert unicode_form({"type": "Lowercase"}) is None and unicode_form(None) is None
