"""`tracegen distill` end to end through the real CLI on tiny offline models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .conftest import tracegen as run_cli
from .distill_fixtures import save_model, write_dataset

ROOT = Path(__file__).parent.parent
ENV_THREADS = {"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}


def tracegen(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=120, env={**os.environ, **ENV_THREADS})


def test_cache_teacher_distill_and_merge_end_to_end(tmp_path: Path) -> None:
    student = save_model(tmp_path / "student", seed=0)
    teacher = save_model(tmp_path / "teacher", seed=1)
    dataset = write_dataset(tmp_path / "data", student, n=6)

    cached = tracegen(
        "distill",
        "cache-teacher",
        str(dataset),
        "--teacher",
        str(teacher),
        "--top-k",
        "8",
        "--out",
        str(tmp_path / "cache"),
        "--json",
    )
    assert cached.returncode == 0, cached.stderr
    assert json.loads(cached.stdout)["tokens"] > 0

    trained = tracegen(
        "distill",
        str(dataset),
        "--student",
        str(student),
        "--out",
        str(tmp_path / "adapter"),
        "--teacher-cache",
        str(tmp_path / "cache"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--json",
    )
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["mode"] == "kd" and summary["steps"] == 2
    assert "KD on" in trained.stderr and "dense preset" in trained.stderr
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and "lm_head" not in saved["target_modules"]
    assert len((tmp_path / "adapter" / "metrics.jsonl").read_text().splitlines()) == 2

    merged = tracegen("distill", "merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "config.json").is_file()
    assert f"merge: {tmp_path / 'merged'}" in merged.stdout and "base" in merged.stdout, "a table, as elsewhere"


def test_aliases_everywhere_and_the_dataset_is_checked_first(tmp_path: Path) -> None:
    missing = tracegen("distill", str(tmp_path / "nope"), "--student", "smollm2", "--out", str(tmp_path / "a"))
    assert missing.returncode == 2 and "no data/*.parquet files" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "a").exists()
    student = save_model(tmp_path / "student", seed=0)
    dataset = write_dataset(tmp_path / "data", student, n=2)
    unknown = tracegen("distill", str(dataset), "--student", "smollm3", "--out", str(tmp_path / "a"))
    assert unknown.returncode == 2 and "model 'smollm3'" in unknown.stderr and "tiny:smollm2" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    # tiny:smollm2 is resolved (not validated as a Hub repo id): it fails on the vocabulary, not the name
    cache = tracegen(
        "distill", "cache-teacher", str(dataset), "--teacher", "tiny:smollm2", "--out", str(tmp_path / "c")
    )
    assert "repo id" not in cache.stderr.lower() and "Traceback" not in cache.stderr


def test_kd_with_another_vocabulary_is_refused_with_exit_2(tmp_path: Path) -> None:
    student = save_model(tmp_path / "student", seed=0)
    alien = save_model(tmp_path / "alien", vocab_size=300, seed=2, corpus=["zebra quartz fog", "other words 123"])
    alien_data = write_dataset(tmp_path / "alien_data", alien, n=2)
    dataset = write_dataset(tmp_path / "data", student, n=4)
    from tracegen.distill.cache import build_cache

    build_cache(alien_data, str(alien), tmp_path / "cache", top_k=4)
    result = tracegen(
        "distill",
        "train",
        str(dataset),
        "--student",
        str(student),
        "--out",
        str(tmp_path / "o"),
        "--teacher-cache",
        str(tmp_path / "cache"),
        "--max-steps",
        "1",
    )
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "KD refused" in errors[0] and "vocabularies" in errors[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_without_a_cache_distill_says_it_is_sequence_level(tmp_path: Path) -> None:
    student = save_model(tmp_path / "student", seed=0)
    dataset = write_dataset(tmp_path / "data", student, n=4)
    result = tracegen(
        "distill",
        str(dataset),
        "--student",
        str(student),
        "--out",
        str(tmp_path / "a"),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--lora-r",
        "4",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert "sequence-level" in result.stderr and json.loads(result.stdout)["mode"] == "ce"


def test_cache_teacher_refuses_an_unknown_dtype_with_exit_2(tmp_path: Path) -> None:
    student = save_model(tmp_path / "student", seed=0)
    dataset = write_dataset(tmp_path / "data", student, n=2)
    args = ("distill", "cache-teacher", str(dataset), "--teacher", str(student), "--dtype", "bf17")
    result = tracegen(*args, "--out", str(tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "--dtype bf17" in errors[0]
    assert not (tmp_path / "cache").exists()
