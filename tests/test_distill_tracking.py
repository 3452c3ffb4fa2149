"""distill.report_to: metrics.jsonl's scalars and the settings reach TensorBoard and wandb (offline) through
accelerate's trackers, read back with each tracker's own reader; a tracker without its package is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from tracegen.config import DistillConfig
from tracegen.distill.tracking import run_config
from tracegen.fingerprint import deciding

from .conftest import ROOT, SECRET
from .distill_fixtures import read_metrics, save_model, write_dataset

RECIPE = """\
distill:
  student: {student}
  lora: {{r: 4, alpha: 8, dropout: 0.0}}
  batch_size: 2
  grad_accum: 2
  max_steps: 3
  learning_rate: 0.01
  min_learning_rate: 0.001
  eval_fraction: 0.25
  eval_every: 2
  report_to: [tensorboard, wandb]
"""


def _env(tmp: Path) -> dict[str, str]:
    """The user's environment without a wandb mode (the default must be offline), wandb's own
    folders in ``tmp``, and secrets that must reach no tracker file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        OMP_NUM_THREADS="2",
        HF_HUB_OFFLINE="1",
        WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp / "wandb-data"),
        TRACEGEN_TEACHER_API_KEY=SECRET,
        HF_TOKEN=SECRET,
    )
    return env


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny student and a dataset formatted with its tokenizer."""
    tmp = tmp_path_factory.mktemp("assets")
    student = save_model(tmp / "student")
    return {"student": student, "dataset": write_dataset(tmp / "data", student, n=8)}


@pytest.fixture(scope="module")
def tracked(assets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 3-step distill run through the CLI with report_to [tensorboard, wandb]; its output folder."""
    tmp = tmp_path_factory.mktemp("tracked")
    student, dataset = assets["student"], assets["dataset"]
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE.format(student=student))
    out = tmp / "adapter"
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "distill", str(dataset), "--out", str(out), "--recipe", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(tmp),
    )
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    return out


def test_tensorboard_event_files_hold_the_metrics_lines(tracked: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "runs" / "tracegen-distill"))
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in read_metrics(tracked):
        for key, value in line.items():
            if key != "step" and value is not None:  # TensorBoard keeps scalars as float32
                expected.setdefault(key, []).append((line["step"], float(np.float32(value))))
    assert got == expected
    assert {"loss", "ce", "kd", "proof_weight", "lr", "tokens_per_s"} <= got.keys()
    assert [step for step, _ in got["eval_loss"]] == [2, 3]


def _wandb_records(run_file: Path) -> list[Any]:
    """The records of a wandb run file: a 7-byte header, then a LevelDB-style log of protobuf records
    (32 KiB blocks; chunks typed full / first / middle / last), parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_the_settings_and_the_metrics(tracked: Path) -> None:
    runs = list((tracked / "runs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "one offline run (no network, no WANDB_MODE set)"
    config: dict[str, Any] = {}
    history: dict[int, dict[str, Any]] = {}
    for record in _wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    settings = DistillConfig.model_validate(json.loads((tracked / "distill_config.json").read_text())["config"])
    assert {k: v for k, v in config.items() if not k.startswith("_")} == run_config(settings)
    assert config["lora.r"] == 4 and config["report_to"] == '["tensorboard", "wandb"]'
    expected = {
        line["step"]: {k: v for k, v in line.items() if k != "step" and v is not None} for line in read_metrics(tracked)
    }
    assert history == expected
    written = b"".join(p.read_bytes() for p in (tracked / "runs").rglob("*") if p.is_file())
    assert SECRET.encode() not in written


def test_a_tracker_without_its_package_is_refused_before_anything_loads(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    """wandb is installed here: hiding it (as Python does for a module set to None) proves the check looks."""
    hide_wandb = "import sys; sys.modules['wandb'] = None; from tracegen.cli import main; main()"
    out = tmp_path / "adapter"
    args = ["distill", str(assets["dataset"]), "--student", str(assets["student"]), "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-c", hide_wandb, *args, "--report-to", "tensorboard", "--report-to", "wandb"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(tmp_path),
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "wandb" in errors[0], done.stderr
    assert "pip install wandb" in done.stderr
    assert "LoRA" not in done.stderr and not out.exists()  # refused before the student loaded or a file was written


def test_report_to_spellings_and_it_changes_no_fingerprint() -> None:
    assert DistillConfig(report_to="tensorboard").report_to == ["tensorboard"]  # type: ignore[arg-type]
    assert DistillConfig(report_to="none").report_to == []  # type: ignore[arg-type]
    assert DistillConfig(report_to=["wandb", "wandb"]).report_to == ["wandb"]
    for bad in (["none", "wandb"], ["comet"]):
        with pytest.raises(ValidationError):
            DistillConfig(report_to=bad)  # type: ignore[arg-type]
    assert deciding(DistillConfig(report_to=["wandb"])) == deciding(DistillConfig())


def test_a_run_that_crashes_mid_training_still_finishes_its_tracker(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash inside training (raised here after step 2) still finishes the tracker run: wandb's run
    file gets its exit record and holds the steps logged before the crash."""
    from tracegen.distill.trainer import train

    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    for key, value in _env(tmp_path).items():
        if key.startswith("WANDB_") or key == "HF_HUB_OFFLINE":
            monkeypatch.setenv(key, value)
    config = DistillConfig.model_validate(
        {
            "student": str(assets["student"]),
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "batch_size": 2,
            "max_steps": 4,
            "eval_fraction": 0.0,
            "report_to": ["wandb"],
        }
    )

    def crash(metrics: Any, model: Any) -> None:
        if metrics.step == 2:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        train(config, assets["dataset"], tmp_path / "out", on_step=crash)
    (run,) = (tmp_path / "out" / "runs" / "wandb").glob("offline-run-*/run-*.wandb")
    kinds = [record.WhichOneof("record_type") for record in _wandb_records(run)]
    assert kinds.count("history") == 2
    assert "exit" in kinds, "the run was never finished"
