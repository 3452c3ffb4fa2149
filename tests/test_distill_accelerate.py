"""`tracegen distill` under `accelerate launch`: two CPU processes (DDP, then FSDP, over gloo) against one.

The launcher reads the config files written here (never ~/.cache). ``MULTI_GPU`` is accelerate's
torchrun-style launch of N processes; without CUDA the trainer joins them into one CPU (gloo) group.
``FSDP`` is the same launch with ``ACCELERATE_USE_FSDP`` set, which the trainer answers by sharding
the student with PyTorch's FSDP2 (real sharding over gloo: each process holds half of every weight).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tracegen.distill.cache import build_cache
from tracegen.distill.trainer import train
from tracegen.recipe import load_recipe

from .distill_fixtures import save_model, write_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent
STEPS = 4
# KD with an eval split; grad_accum 3 over 2 processes: process 0 trains micro-batches 0 and 2 of each
# step, process 1 micro-batch 1; the one eval batch goes to process 0 alone. No dropout: the processes
# draw other masks than one process would.
RECIPE = """\
distill:
  student: {student}
  method: {method}
  teacher_cache: {cache}
  lora: {{r: 8, alpha: 16, dropout: 0.0}}
  batch_size: 2
  grad_accum: {grad_accum}
  max_steps: {steps}
  learning_rate: 0.01
  min_learning_rate: 0.001
  eval_fraction: 0.2
  eval_every: 2
  save_every: 1
"""
ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
dynamo_backend: 'NO'
use_cpu: false
"""
FSDP_CONFIG = (
    ACCELERATE_CONFIG.replace("distributed_type: MULTI_GPU", "distributed_type: FSDP")
    + """\
fsdp_config:
  fsdp_version: 2
"""
)
# Interrupted at step 2 on every process (process 0 writes the checkpoint), then resumed: under DDP both.
INTERRUPT_AND_RESUME = """\
import sys
from pathlib import Path

from accelerate import PartialState

from tracegen.recipe import load_recipe
from tracegen.distill.trainer import train

recipe, dataset, out = (Path(a) for a in sys.argv[1:])
config = load_recipe(recipe).distill


def stop(metrics, model):
    if metrics.step == 2:
        raise KeyboardInterrupt


assert train(config, dataset, out, on_step=stop).interrupted
PartialState().wait_for_everyone()  # a fresh launch would find the checkpoint written, too
assert train(config, dataset, out, resume=True).steps == 4
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("accelerate")
    student = save_model(root / "student", seed=0)
    teacher = save_model(root / "teacher", seed=1)
    dataset = write_dataset(root / "dataset", student, n=12)
    build_cache(dataset, str(teacher), root / "cache", top_k=8, temperature=2.0)
    for grad_accum in (3, 2, 1):
        recipe = RECIPE.format(student=student, cache=root / "cache", grad_accum=grad_accum, steps=STEPS, method="lora")
        (root / f"recipe-{grad_accum}.yaml").write_text(recipe)
        (root / f"recipe-full-{grad_accum}.yaml").write_text(recipe.replace("method: lora", "method: full"))
    (root / "accelerate.yaml").write_text(ACCELERATE_CONFIG)
    (root / "fsdp.yaml").write_text(FSDP_CONFIG)
    reference = root / "one-process"
    train(load_recipe(root / "recipe-3.yaml").distill, dataset, reference)
    return {"root": root, "dataset": dataset, "recipe": root / "recipe-3.yaml", "reference": reference}


def launch(assets: dict[str, Path], *command: str, config: str = "accelerate.yaml") -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` two processes; the port is a free one, the threads one per process (2 cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(assets["root"] / "hf")}
    args = ["--config_file", str(assets["root"] / config), "--main_process_port", "0"]
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *args, *command],
        capture_output=True,
        text=True,
        timeout=300,  # a loaded 2-core machine: the FSDP launch has taken over 120 s
        cwd=ROOT,
        env=env,
    )


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference: Path, out: Path) -> None:
    one, two = metrics(reference), metrics(out)
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    assert [m["eval_loss"] is not None for m in two] == [False, True, False, True]
    for a, b in zip(one, two, strict=True):
        assert (b["supervised_tokens"], b["tokens"], b["lr"]) == (a["supervised_tokens"], a["tokens"], a["lr"])
        for key in ("loss", "ce", "kd", "grad_norm", *(["eval_loss"] if a["eval_loss"] is not None else [])):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (b["step"], key)
    weights = (
        "adapter_model.safetensors" if (reference / "adapter_model.safetensors").is_file() else "model.safetensors"
    )
    wa, wb = load_file(str(reference / weights)), load_file(str(out / weights))
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_two_processes_train_the_steps_of_one(assets: dict[str, Path]) -> None:
    out = assets["root"] / "two-processes"
    result = launch(
        assets,
        *("-m", "tracegen.cli", "distill", str(assets["dataset"])),
        *("--out", str(out), "--recipe", str(assets["recipe"]), "--json"),
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == STEPS  # one summary: process 1 prints nothing
    assert "2 processes" in result.stderr
    assert result.stderr.count("LoRA r=8") == 1 and result.stderr.count(f"step {STEPS}/{STEPS}") == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in assets["reference"].iterdir())
    assert_same_run(assets["reference"], out)


def test_checkpoint_written_and_resumed_under_two_processes(assets: dict[str, Path]) -> None:
    out = assets["root"] / "resumed"
    script = assets["root"] / "interrupt_and_resume.py"
    script.write_text(INTERRUPT_AND_RESUME)
    result = launch(assets, str(script), str(assets["recipe"]), str(assets["dataset"]), str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("Interrupted after step 2/4") == 1
    assert result.stderr.count("Resuming from") == 1
    assert not (out / "checkpoint").exists()
    assert_same_run(assets["reference"], out)


def test_fewer_micro_batches_than_processes_is_refused(assets: dict[str, Path]) -> None:
    out = assets["root"] / "refused"
    result = launch(
        assets,
        *("-m", "tracegen.cli", "distill", str(assets["dataset"])),
        *("--out", str(out), "--recipe", str(assets["root"] / "recipe-1.yaml")),
    )
    assert result.returncode != 0
    assert "Error: grad_accum 1 is less than the 2 processes" in result.stderr
    assert not out.exists()


@pytest.fixture(scope="module")
def fsdp_reference(assets: dict[str, Path]) -> Path:
    """One process with grad_accum 2 (FSDP needs a multiple of the process count)."""
    reference = assets["root"] / "one-process-accum-2"
    train(load_recipe(assets["root"] / "recipe-2.yaml").distill, assets["dataset"], reference)
    return reference


def test_fsdp_shards_the_student_and_trains_the_steps_of_one(assets: dict[str, Path], fsdp_reference: Path) -> None:
    out = assets["root"] / "fsdp"
    result = launch(
        assets,
        *("-m", "tracegen.cli", "distill", str(assets["dataset"])),
        *("--out", str(out), "--recipe", str(assets["root"] / "recipe-2.yaml")),
        config="fsdp.yaml",
    )
    assert result.returncode == 0, result.stderr
    assert "2 processes (FSDP)" in result.stderr and result.stderr.count(f"step {STEPS}/{STEPS}") == 1
    # each process holds about half of the weights
    whole = sum(t.numel() for t in load_file(str(assets["root"] / "student" / "model.safetensors")).values())
    here = int(re.search(r"sharded over 2 processes \(([\d,]+) weights here\)", result.stderr)[1].replace(",", ""))
    assert 0.4 * whole < here < 0.65 * whole
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fsdp_reference.iterdir())
    assert_same_run(fsdp_reference, out)


def test_fsdp_resumes_from_its_periodic_checkpoint(assets: dict[str, Path], fsdp_reference: Path) -> None:
    out = assets["root"] / "fsdp-resumed"
    script = assets["root"] / "interrupt_and_resume.py"
    script.write_text(INTERRUPT_AND_RESUME)
    result = launch(
        assets, str(script), str(assets["root"] / "recipe-2.yaml"), str(assets["dataset"]), str(out), config="fsdp.yaml"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("the last periodic checkpoint") == 1 and result.stderr.count("Resuming from") == 1
    assert_same_run(fsdp_reference, out)


def test_fsdp_refuses_a_window_the_processes_cannot_share_evenly(assets: dict[str, Path]) -> None:
    out = assets["root"] / "fsdp-refused"
    result = launch(
        assets,
        *("-m", "tracegen.cli", "distill", str(assets["dataset"])),
        *("--out", str(out), "--recipe", str(assets["recipe"])),
        config="fsdp.yaml",
    )
    assert result.returncode != 0
    assert "under FSDP, grad_accum 3 must be a multiple of the 2 processes" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("launcher", "grad_accum"), [("accelerate.yaml", 3), ("fsdp.yaml", 2)], ids=["ddp", "fsdp"])
def test_full_training_on_two_processes_trains_the_steps_of_one(
    assets: dict[str, Path], launcher: str, grad_accum: int
) -> None:
    recipe = assets["root"] / f"recipe-full-{grad_accum}.yaml"
    reference = assets["root"] / f"one-process-full-{grad_accum}"
    if not reference.exists():
        train(load_recipe(recipe).distill, assets["dataset"], reference)
    out = assets["root"] / f"two-processes-full-{launcher}"
    command = ("-m", "tracegen.cli", "distill", str(assets["dataset"]), "--out", str(out), "--recipe", str(recipe))
    result = launch(assets, *command, config=launcher)
    assert result.returncode == 0, result.stderr
    assert "full, fp32" in result.stderr and "2 processes" in result.stderr
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert_same_run(reference, out)
