"""Full-parameter training (``distill.method: full``), model dtypes and optimizers, on tiny offline models."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tracegen.distill.cache import TeacherCache, build_cache
from tracegen.distill.data import collate, load_rows, split_indices
from tracegen.distill.forward import supervised_logits
from tracegen.distill.merge import merge_adapter
from tracegen.distill.trainer import StepMetrics, train
from tracegen.errors import BadInputError

from .distill_fixtures import read_metrics, save_model, write_dataset
from .distill_fixtures import small_config as small

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("full")
    student = save_model(root / "student", seed=0)
    tied = save_model(root / "tied", seed=0, arch="llama")  # tied embeddings: one weight, trained once
    dataset = write_dataset(root / "dataset", student, n=12)
    return {"root": root, "student": student, "tied": tied, "dataset": dataset}


def held_out_loss(model_dir: Path, dataset: Path, eval_fraction: float) -> float:
    """Mean CE per supervised token of the eval rows, as the trainer splits them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = load_rows(dataset)
    batch = collate(rows, split_indices(len(rows), eval_fraction).eval, 512)
    with torch.inference_mode():
        logits, targets = supervised_logits(model, batch, torch.device("cpu"))
        return float(torch.nn.functional.cross_entropy(logits, targets))


@pytest.mark.parametrize("arch", ["student", "tied"])
def test_full_training_changes_every_weight_and_lowers_held_out_loss(
    assets: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    from transformers import AutoModelForCausalLM

    original = dict(AutoModelForCausalLM.from_pretrained(str(assets[arch])).named_parameters())
    seen: dict[str, torch.Tensor] = {}

    def grab(m: StepMetrics, model: Any) -> None:
        seen.update({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})

    config = small(assets[arch], method="full", max_steps=6, learning_rate=2e-3, eval_fraction=0.25, eval_every=6)
    summary = train(config, assets["dataset"], tmp_path / "out", on_step=grab)
    assert summary.steps == 6
    assert seen.keys() == original.keys()
    unchanged = [k for k, v in seen.items() if torch.equal(v, original[k].detach())]
    assert not unchanged
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert held_out_loss(out, assets["dataset"], 0.25) < 0.9 * held_out_loss(assets[arch], assets["dataset"], 0.25)
    # merge is a no-op: the model's own files, linked
    merged = merge_adapter(out, tmp_path / "merged")
    assert merged.out == tmp_path / "merged"
    assert os.path.samefile(out / "model.safetensors", tmp_path / "merged" / "model.safetensors")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "tokenizer.json").is_file()


def test_full_resume_reproduces_the_uninterrupted_run(assets: dict[str, Path], tmp_path: Path) -> None:
    config = small(assets["student"], method="full", max_steps=4, save_every=1, learning_rate=2e-3)
    train(config, assets["dataset"], tmp_path / "a")

    def stop(m: StepMetrics, model: Any) -> None:
        if m.step == 2:
            raise KeyboardInterrupt

    assert train(config, assets["dataset"], tmp_path / "b", on_step=stop).interrupted
    assert (tmp_path / "b" / "checkpoint" / "model.safetensors").is_file()
    assert train(config, assets["dataset"], tmp_path / "b", resume=True).steps == 4
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-6)
    wa, wb = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def safetensors_dtypes(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def test_full_model_is_written_in_model_dtype(assets: dict[str, Path], tmp_path: Path) -> None:
    config = small(assets["student"], method="full", max_steps=1, model_dtype="bf16")
    train(config, assets["dataset"], tmp_path / "out")
    assert safetensors_dtypes(tmp_path / "out" / "model.safetensors") == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_bf16_student_keeps_a_fp32_adapter_and_merges_to_bf16(assets: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(assets["student"]), dtype=torch.bfloat16).save_pretrained(str(bf16))
    AutoTokenizer.from_pretrained(str(assets["student"])).save_pretrained(str(bf16))
    train(small(bf16, max_steps=2), assets["dataset"], tmp_path / "adapter")  # model_dtype auto: bf16
    assert safetensors_dtypes(tmp_path / "adapter" / "adapter_model.safetensors") == {"F32"}
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert safetensors_dtypes(tmp_path / "merged" / "model.safetensors") == {"BF16"}
    ids = torch.tensor([load_rows(assets["dataset"])[0].input_ids])
    exact = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(bf16), dtype=torch.float32), str(tmp_path / "adapter")
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(bf16)).eval()
    assert merged.dtype == torch.bfloat16
    with torch.inference_mode():
        want, got, base = exact(ids).logits, merged(ids).logits.float(), plain(ids).logits.float()
    assert (got - want).abs().max() < 0.5 * (base - want).abs().max()  # bf16 rounding, well below the adapter's effect


def test_cache_teacher_loads_the_teacher_in_the_dtype_asked(assets: dict[str, Path], tmp_path: Path) -> None:
    build_cache(assets["dataset"], str(assets["student"]), tmp_path / "auto", top_k=4)
    build_cache(assets["dataset"], str(assets["student"]), tmp_path / "bf16", top_k=4, dtype="bf16")
    assert TeacherCache(tmp_path / "auto").meta["teacher_dtype"] == "float32"  # the checkpoint's own
    assert TeacherCache(tmp_path / "bf16").meta["teacher_dtype"] == "bfloat16"


def test_fused_adamw_trains_the_same_steps(assets: dict[str, Path], tmp_path: Path) -> None:
    runs = {}
    for optimizer in ("adamw_torch", "adamw_torch_fused"):
        train(
            small(assets["student"], method="full", max_steps=3, optimizer=optimizer),
            assets["dataset"],
            tmp_path / optimizer,
        )
        runs[optimizer] = [m["loss"] for m in read_metrics(tmp_path / optimizer)]
    assert runs["adamw_torch_fused"] == pytest.approx(runs["adamw_torch"], rel=1e-4)


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_are_refused_without_cuda_and_bitsandbytes(
    assets: dict[str, Path], tmp_path: Path, optimizer: str
) -> None:
    with pytest.raises(BadInputError, match=f"optimizer {optimizer} needs a CUDA GPU and bitsandbytes"):
        train(small(assets["student"], method="full", optimizer=optimizer), assets["dataset"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
