"""The training table of a card, built from the sources it names (``data.sources`` in a recipe).

Each source is a Hub dataset id, a local dataset folder or a .jsonl / .parquet file, read through
:func:`tracegen.data.importers.read_rows` (the same path format's importer uses). Its columns are
mapped onto the table's (``columns``), the sources are concatenated in order, and rows whose
``dedup_on`` values repeat (whitespace-normalised), within a source or across sources, are kept
once: the first. The row counts the card states (per source, and for the table) are compared with
what was read and kept; every difference is reported (returned, and printed by the caller), never
silently absorbed. Not done: any cleaning beyond that (the card's own filtering, if any, is not
known to tracegen).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from tracegen.config import DataConfig
from tracegen.data.importers import read_rows
from tracegen.errors import BadInputError
from tracegen.store import write_json_atomic, write_lines_atomic

TABLE = "table.jsonl"
REPORT = "sources.json"


class SourceCount(NamedTuple):
    path: str
    read: int  # rows the source has
    kept: int  # rows it added to the table (after dedup)
    stated: int | None  # rows the card states for it


class SourcesReport(NamedTuple):
    table: Path  # the merged .jsonl, columns as configured plus ``source``
    sources: list[SourceCount]
    rows: int  # rows of the table
    stated: int | None  # rows the card states for the table
    differences: list[str]  # one line per count that differs from the card's

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "stated_rows": self.stated,
            "sources": [s._asdict() for s in self.sources],
            "differences": self.differences,
        }


def _key(row: dict[str, Any], columns: list[str]) -> tuple[str, ...]:
    return tuple(" ".join(str(row[c]).split()) for c in columns)


def build_table(config: DataConfig, out_dir: Path) -> SourcesReport:
    """Read, map, concatenate and dedup ``config.sources`` into ``out_dir/table.jsonl`` (+ ``sources.json``)."""
    unknown = [c for c in config.dedup_on if c not in config.columns]
    if unknown:
        raise BadInputError(
            f"data.dedup_on names {', '.join(unknown)}, not a table column ({', '.join(config.columns)})",
            hint="dedup on columns listed in data.columns",
        )
    seen: set[tuple[str, ...]] = set()
    table: list[dict[str, Any]] = []
    counts: list[SourceCount] = []
    differences: list[str] = []
    for source in config.sources:
        mapping = {column: source.columns.get(column, column) for column in config.columns}
        read = kept = 0
        for where, row in read_rows(Path(source.path)):
            read += 1
            missing = [f"{theirs} (for {ours})" for ours, theirs in mapping.items() if row.get(theirs) is None]
            if missing:
                raise BadInputError(
                    f"{source.path}:{where}: no column {', '.join(missing)}; columns here: {', '.join(sorted(row))}",
                    hint="map it in data.sources[].columns (table column: source column)",
                )
            mapped = {ours: row[theirs] for ours, theirs in mapping.items()}
            if config.dedup_on:
                key = _key(mapped, config.dedup_on)
                if key in seen:
                    continue
                seen.add(key)
            table.append({**mapped, "source": source.path})
            kept += 1
        counts.append(SourceCount(source.path, read, kept, source.rows))
        if source.rows is not None and source.rows != read:
            differences.append(f"{source.path}: the card states {source.rows} rows, the source has {read}")
    if config.rows is not None and config.rows != len(table):
        differences.append(f"the table: the card states {config.rows} rows, the sources give {len(table)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SourcesReport(out_dir / TABLE, counts, len(table), config.rows, differences)
    write_lines_atomic(report.table, (json.dumps(row, ensure_ascii=False) for row in table))
    write_json_atomic(out_dir / REPORT, report.summary())
    return report
