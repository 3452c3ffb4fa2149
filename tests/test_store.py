from __future__ import annotations

import json
from pathlib import Path

import pytest

from tracegen.errors import BadInputError
from tracegen.store import JsonlStore, repair_and_index, staged_dir, write_json_atomic


def test_torn_tail_is_cut_and_appends_continue(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "mess')
    store = JsonlStore(path)
    assert store.open() == ["a", "b"]
    store.append(json.dumps({"id": "d"}))
    store.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "d"]


def test_complete_but_unreadable_last_line_counts_as_torn(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a"}\n{"id": \n')
    assert repair_and_index(path) == ["a"]
    assert path.read_text() == '{"id": "a"}\n'


def test_damage_in_the_middle_is_refused_not_discarded(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    original = '{"id": "a"}\nGARBAGE\n{"id": "c"}\n'
    path.write_text(original)
    with pytest.raises(BadInputError, match=r"t\.jsonl:2: corrupt record"):
        repair_and_index(path)
    assert path.read_text() == original


def test_atomic_json_leaves_no_temp_files(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    write_json_atomic(tmp_path / "m.json", {"a": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_staged_dir_replaces_the_folder_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.bin").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_dir(out) as tmp:  # interrupted half-way: nothing changes
        (tmp / "new.bin").write_text("half")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in out.iterdir()] == ["old.bin"]
    with staged_dir(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.bin").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary or old folder left
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["sub", "sub/new.bin"]
    assert out.stat().st_mode & 0o777 == 0o755


def test_a_record_from_a_newer_tracegen_is_refused_by_version(tmp_path: Path) -> None:
    """Both when the record still validates and when a newer field shape does not."""
    from tracegen.records import SCHEMA_VERSION
    from tracegen.store import read_trajectories
    from tracegen.testing.synthetic import make_trajectory

    record = json.loads(make_trajectory(0).model_dump_json())
    path = tmp_path / "t.jsonl"
    assert [t.id for t in read_trajectories(_write(path, [record]))] == [record["id"]]  # today's version reads
    newer = {**record, "schema_version": SCHEMA_VERSION + 1}
    reshaped = {**newer, "messages": "a shape this version does not know"}
    for rows in ([record, newer], [reshaped]):
        with pytest.raises(BadInputError) as info:
            list(read_trajectories(_write(path, rows)))
        line = len(rows)
        assert f"t.jsonl:{line}: written by a newer tracegen (schema_version {SCHEMA_VERSION + 1}" in info.value.message
        assert "upgrade tracegen" in (info.value.hint or "")


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
