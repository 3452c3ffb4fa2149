"""The train/eval split: `split_method: hf` is `datasets`' own train_test_split, row for row."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracegen.distill.data import held_out_tasks, split_indices


@pytest.mark.parametrize(
    ("n", "fraction", "seed"),
    [
        (6122, 0.05, 42),  # the STEM cards: 5,815 train / 307 test
        (30, 0.1, 7),  # 0.1 * 30 = 3.0000000000000004 in floats: datasets takes 4 rows
        (1599, 0.05, 0),
        (5, 0.5, 123),
    ],
)
def test_hf_split_equals_datasets_train_test_split(n: int, fraction: float, seed: int) -> None:
    from datasets import Dataset

    table = Dataset.from_dict({"row": list(range(n))})
    want = table.train_test_split(test_size=fraction, seed=seed)
    got = split_indices(n, fraction, seed, "hf")
    assert got.eval == sorted(want["test"]["row"])
    assert got.train == sorted(want["train"]["row"])


def test_the_cards_counts_hf_against_torch() -> None:
    hf = split_indices(6122, 0.05, 42, "hf")
    assert (len(hf.train), len(hf.eval)) == (5815, 307)
    torch_split = split_indices(6122, 0.05, 42)
    assert (len(torch_split.train), len(torch_split.eval)) == (5816, 306), "the torch split floors the eval count"


def test_no_eval_fraction_holds_out_nothing() -> None:
    assert split_indices(4, 0.0, 42, "hf") == ([0, 1, 2, 3], [])


def test_held_out_tasks_are_the_split_eval_rows_with_question_and_answer(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def message(role: str, content: str) -> dict[str, str]:
        return {"role": role, "content": content}

    rows = {
        "id": [f"r{i}" for i in range(10)],
        "messages": [[message("user", f"Q{i}"), message("assistant", f"A{i}")] for i in range(10)],
    }
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table(rows), tmp_path / "data" / "train-00000-of-00001.parquet")
    tasks = held_out_tasks(tmp_path, 0.25, 42, "hf")
    want = split_indices(10, 0.25, 42, "hf").eval  # ceil(2.5) = 3 rows
    assert tasks == [{"id": f"r{i}", "prompt": f"Q{i}", "reference": f"A{i}"} for i in want] and len(want) == 3
