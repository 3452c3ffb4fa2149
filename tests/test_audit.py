"""tracegen audit: the token view, invariants over the whole dataset, and the HTML page in headless Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tracegen.config import FormatConfig
from tracegen.data.format import format_dataset
from tracegen.testing.synthetic import write_trajectories

from .conftest import tracegen


@pytest.fixture
def dataset(tiny_tokenizer: Path, tmp_path: Path) -> Path:
    src = tmp_path / "t.jsonl"
    write_trajectories(str(src), 5, source="mixed")
    out = tmp_path / "ds"
    format_dataset(src, out, FormatConfig(template="chat", tokenizer=str(tiny_tokenizer)))
    return out


def test_audit_shows_tokens_legend_counts_and_passes(dataset: Path) -> None:
    r = tracegen("audit", str(dataset), "--index", "1")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # rich wraps long lines
    for needle in (
        "legend",
        "masked: prompt",
        "masked: observation (simulated)",
        "sample 1: traj-00001",
        "trained fraction",
        "straddled tokens",
        "invariants hold over 5 samples",
    ):
        assert needle in out, needle
    assert "↵" in out  # newlines made visible


def _tamper(dataset: Path, column: str, fn) -> None:  # type: ignore[no-untyped-def]
    shard = next((dataset / "data").glob("*.parquet"))
    table = pq.read_table(shard)
    rows = table.to_pylist()
    fn(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), shard)


def test_audit_fails_naming_sample_and_position_when_a_prompt_token_is_trained(dataset: Path) -> None:
    def train_prompt(rows: list[dict]) -> None:
        row = rows[2]
        prompt = next(s for s in row["spans"] if s["kind"] == "prompt")
        # find a token inside the prompt span: the first token after the user header is prompt text
        text_before = row["text"][: prompt["start"]]
        from tracegen.data.tokenize import load_tokenizer

        tok = load_tokenizer(
            str(Path(__import__("json").loads((dataset / "tracegen.json").read_text())["tokenizer"]["path"]))
        )
        ids = row["input_ids"]
        k = next(i for i in range(len(ids)) if len(tok.decode(ids[:i])) >= len(text_before) + 1)
        row["labels"][k - 1] = ids[k - 1]

    _tamper(dataset, "labels", train_prompt)
    r = tracegen("audit", str(dataset))
    assert r.returncode == 1
    assert r.stderr.startswith("Error:") and "sample 2 (traj-00002) position" in r.stderr
    assert "inside a prompt/system/observation span" in r.stderr


def test_audit_catches_broken_spans_and_labels(dataset: Path) -> None:
    def damage(rows: list[dict]) -> None:
        rows[0]["spans"][1]["start"] += 1
        rows[1]["labels"] = [-100] * len(rows[1]["labels"])
        rows[3]["text"] = rows[3]["text"] + "x"

    _tamper(dataset, "spans", damage)
    r = tracegen("audit", str(dataset))
    assert r.returncode == 1
    out = " ".join(r.stdout.split())  # rich wraps long lines
    assert "sample 0 (traj-00000): span 1" in out
    assert "sample 1 (traj-00001): no trained token" in out
    assert "sample 3 (traj-00003): decode(input_ids) differs" in out


def test_audit_bad_index_is_usage_error(dataset: Path) -> None:
    r = tracegen("audit", str(dataset), "--index", "99")
    assert r.returncode == 2 and "--index 99" in r.stderr


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_audit_renders_in_headless_chromium(dataset: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("TRACEGEN_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required (TRACEGEN_REQUIRE_BROWSER=1): run scripts/provision_browser.sh")
        pytest.skip("chromium not installed: run scripts/provision_browser.sh (CI requires it)")
    page = tmp_path / "audit.html"
    r = tracegen("audit", str(dataset), "--html", str(page))
    assert r.returncode == 0, r.stderr
    source = page.read_text()
    assert "http://" not in source and "https://" not in source and "<link" not in source  # self-contained
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [browser, *flags, "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'class="sw"' in dom and "masked: observation (simulated)" in dom  # the legend was built by the script
    assert dom.count('class="tok') > 100  # tokens rendered, with visible boundaries
    assert 'data-rendered="' in dom and "<option" in dom  # sample picker filled
    assert "position 0 | id " in dom  # hover info (title) carries id, label, kind, weight
    assert "invariants hold" in dom and "trained" in dom
    shot = tmp_path / "audit.png"
    subprocess.run(
        [
            browser,
            *flags,
            "--window-size=1200,900",
            "--virtual-time-budget=3000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
