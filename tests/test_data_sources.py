"""data.sources: the card's training table from several sources (local folders stand in for Hub ids)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tracegen
from tracegen.config import DataConfig, DataSource
from tracegen.data.sources import build_table
from tracegen.errors import BadInputError


def _sources(root: Path) -> dict[str, Path]:
    """Three shapes: a save_to_disk folder, a Hub-layout folder of parquet files, a .jsonl file."""
    import datasets

    saved = root / "physics-saved"
    datasets.Dataset.from_dict(
        {"question": ["Q1", "Q2", "Q3"], "CoT": ["c1", "c2", "c3"], "response": ["a1", "a2", "a3"]}
    ).save_to_disk(str(saved))
    hub = root / "mechanics-hub"
    (hub / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"instruction": ["Q4", "  Q2 ", "Q5"], "reasoning": ["c4", "c2b", "c5"], "output": ["a4", "a2b", "a5"]}
    ).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    lines = root / "relativity.jsonl"
    lines.write_text("".join(json.dumps({"question": q, "CoT": "c", "response": "a"}) + "\n" for q in ("Q6", "Q7")))
    return {"saved": saved, "hub": hub, "lines": lines}


HUB_COLUMNS = {"question": "instruction", "CoT": "reasoning", "response": "output"}


def _config(paths: dict[str, Path], table_rows: int) -> DataConfig:
    return DataConfig(
        sources=[
            DataSource(path=str(paths["saved"]), rows=3),
            DataSource(path=str(paths["hub"]), columns=HUB_COLUMNS, rows=4),
            DataSource(path=str(paths["lines"])),
        ],
        rows=table_rows,
    )


def test_sources_are_mapped_merged_deduplicated_and_counted_against_the_card(tmp_path: Path) -> None:
    paths = _sources(tmp_path)
    report = build_table(_config(paths, table_rows=8), tmp_path / "out")
    rows = [json.loads(line) for line in report.table.read_text().splitlines()]
    assert [r["question"] for r in rows] == ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6", "Q7"]  # "  Q2 " repeats Q2
    assert rows[3] == {"question": "Q4", "CoT": "c4", "response": "a4", "source": str(paths["hub"])}
    assert [(s.read, s.kept) for s in report.sources] == [(3, 3), (3, 2), (2, 2)]
    assert report.differences == [
        f"{paths['hub']}: the card states 4 rows, the source has 3",
        "the table: the card states 8 rows, the sources give 7",
    ]
    assert json.loads((tmp_path / "out" / "sources.json").read_text())["differences"] == report.differences


def test_counts_that_match_the_card_report_nothing(tmp_path: Path) -> None:
    config = _config(_sources(tmp_path), table_rows=7)
    config.sources[1].rows = 3
    assert build_table(config, tmp_path / "out").differences == []


def test_an_unmapped_column_names_the_source_row_and_fix(tmp_path: Path) -> None:
    paths = _sources(tmp_path)
    with pytest.raises(BadInputError, match=r"mechanics-hub:1: no column question \(for question\)") as err:
        build_table(DataConfig(sources=[DataSource(path=str(paths["hub"]))]), tmp_path / "out")
    assert "data.sources[].columns" in (err.value.hint or "")
    assert not (tmp_path / "out" / "table.jsonl").exists()


def test_run_builds_the_table_then_formats_it(tmp_path: Path) -> None:
    paths = _sources(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "run: {stages: [format]}\n"
        "data:\n"
        "  sources:\n"
        "    - {path: physics-saved, rows: 3}\n"
        "    - {path: mechanics-hub, columns: {question: instruction, CoT: reasoning, response: output}, rows: 4}\n"
        "  rows: 5\n"
        "format: {template: proof, import_format: cot, tokenizer: qwen3}\n"
    )
    proc = tracegen("run", str(recipe), "--out", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = " ".join(proc.stderr.split())  # the console wraps long lines
    assert "data: differs from the card: " in said and "the card states 4 rows, the source has 3" in said
    facts = json.loads((tmp_path / "w" / ".run" / "format.json").read_text())["facts"]
    assert facts["sources"]["rows"] == 5 and facts["sources"]["differences"] == [
        f"{paths['hub']}: the card states 4 rows, the source has 3"
    ]
    import datasets

    assert datasets.load_dataset(str(tmp_path / "w" / "dataset"), split="train").num_rows == 5


def test_run_data_and_data_sources_together_are_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {stages: [format], data: d.jsonl}\ndata: {sources: [{path: x.jsonl}]}\n")
    proc = tracegen("run", str(recipe), "--out", str(tmp_path / "w"))
    assert proc.returncode == 2 and "run.data and data.sources both name the data" in proc.stderr
