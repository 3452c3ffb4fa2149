"""Training, caching and merging on tiny offline models (CPU, a few seconds each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tracegen.config import LoraSettings
from tracegen.distill.cache import TeacherCache, build_cache
from tracegen.distill.data import collate, collate_packed, load_rows
from tracegen.distill.forward import supervised_logits
from tracegen.distill.losses import token_weights, topk_from_logits, weighted_ce_sum
from tracegen.distill.trainer import StepMetrics, train
from tracegen.errors import BadInputError

from .distill_fixtures import read_metrics, save_model, write_dataset
from .distill_fixtures import small_config as small

torch.set_num_threads(2)
OTHER_CORPUS = ["zebra quartz jumps over lazy vexing fog", "completely different words here 123"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    student = save_model(root / "student", seed=0)
    teacher = save_model(root / "teacher", seed=1)  # same tokenizer, other weights
    alien = save_model(root / "alien", vocab_size=300, seed=2, corpus=OTHER_CORPUS)  # other vocabulary
    dataset = write_dataset(root / "dataset", student, n=8)
    return {"root": root, "student": student, "teacher": teacher, "alien": alien, "dataset": dataset}


def test_adapter_weights_change_and_base_weights_do_not(assets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(assets["student"])).state_dict()
    seen: dict[str, torch.Tensor] = {}

    def grab(m: StepMetrics, model: Any) -> None:
        seen.update({k: v.detach().clone() for k, v in model.named_parameters()})

    summary = train(small(assets["student"]), assets["dataset"], tmp_path / "out", on_step=grab)
    assert summary.mode == "ce" and summary.steps == 4
    lora = {k: v for k, v in seen.items() if "lora_" in k}
    base = {k: v for k, v in seen.items() if "lora_" not in k}
    assert lora and all("lm_head" not in k and "embed" not in k for k in lora)
    assert any(float(v.abs().sum()) > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero
    for name, value in base.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, original[key]), name
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_loss_falls_when_overfitting(assets: dict[str, Path], tmp_path: Path) -> None:
    # Constant weights here: the decaying proof weight would lower the loss by itself.
    two_rows = write_dataset(tmp_path / "two", assets["student"], n=2)
    config = small(
        assets["student"], max_steps=20, grad_accum=1, warmup_steps=0, proof_weight_start=1.0, proof_weight_end=1.0
    )
    train(config, two_rows, tmp_path / "out")
    losses = [m["loss"] for m in read_metrics(tmp_path / "out")]
    assert losses[-1] < 0.6 * losses[0], losses


def test_proof_weight_decays_over_the_run(assets: dict[str, Path], tmp_path: Path) -> None:
    train(small(assets["student"], max_steps=3), assets["dataset"], tmp_path / "out")
    assert [m["proof_weight"] for m in read_metrics(tmp_path / "out")] == pytest.approx([2.5, 2.0, 1.5])


def test_proof_weighting_off_is_plain_sft(assets: dict[str, Path], tmp_path: Path) -> None:
    train(small(assets["student"], max_steps=3, proof_weighting=False), assets["dataset"], tmp_path / "out")
    assert [m["proof_weight"] for m in read_metrics(tmp_path / "out")] == [1.0, 1.0, 1.0]


def test_masked_tokens_change_nothing(assets: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(assets["student"]))
    rows = load_rows(assets["dataset"])
    batch = collate(rows, [0, 1], 512)

    @torch.no_grad()
    def loss(b: Any) -> float:
        logits, targets = supervised_logits(model, b, torch.device("cpu"))
        sel = b.supervised()
        return float(weighted_ce_sum(logits, targets, token_weights(b.proof_mask[:, 1:][sel], 2.5)))

    reference = loss(batch)
    masked = batch.labels == -100
    assert loss(batch._replace(proof_mask=torch.where(masked, 1, batch.proof_mask))) == reference
    # Control: a supervised label does matter.
    first = int((~masked[0, 1:]).nonzero()[0]) + 1
    changed = batch.labels.clone()
    changed[0, first] = (changed[0, first] + 1) % 100
    assert loss(batch._replace(labels=changed)) != reference


def test_resume_reproduces_the_uninterrupted_run(assets: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = small(assets["student"], max_steps=4, save_every=1, lora=LoraSettings(r=8, alpha=16, dropout=0.1))
    train(config, assets["dataset"], tmp_path / "a")

    def stop(m: StepMetrics, model: Any) -> None:
        if m.step == 2:
            raise KeyboardInterrupt

    first = train(config, assets["dataset"], tmp_path / "b", on_step=stop)
    assert first.interrupted and first.steps == 2
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    second = train(config, assets["dataset"], tmp_path / "b", resume=True)
    assert not second.interrupted and second.steps == 4
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    assert [m["loss"] for m in a] == pytest.approx([m["loss"] for m in b], rel=1e-5)
    wa, wb = (
        load_file(str(tmp_path / "a" / "adapter_model.safetensors")),
        load_file(str(tmp_path / "b" / "adapter_model.safetensors")),
    )
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_cache_round_trip_and_kd_training(assets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cache_dir = tmp_path / "cache"
    summary = build_cache(
        assets["dataset"], str(assets["teacher"]), cache_dir, top_k=16, temperature=2.0, batch_size=3, shard_tokens=200
    )
    assert summary.shards > 1 and summary.tokens > 0
    cache = TeacherCache(cache_dir)
    assert isinstance(cache._shards[0]["ids"], np.memmap)
    teacher = AutoModelForCausalLM.from_pretrained(str(assets["teacher"]))
    rows = load_rows(assets["dataset"])
    for r in (0, 5):
        batch = collate(rows, [r], 512)
        with torch.inference_mode():
            live = topk_from_logits(supervised_logits(teacher, batch, torch.device("cpu")).logits, 16, 2.0)
        got = cache.batch([r], [batch.n_supervised()], torch.device("cpu"))
        assert torch.equal(got.ids, live.ids)
        assert torch.allclose(got.logprobs, live.logprobs, atol=2e-3, rtol=1e-3)  # fp16
        assert torch.allclose(got.lse_t, live.lse_t, atol=1e-5)

    out = tmp_path / "kd"
    result = train(small(assets["student"], teacher_cache=str(cache_dir)), assets["dataset"], out)
    assert result.mode == "kd"
    assert all(m["kd"] > 0 for m in read_metrics(out))


def test_kd_refused_when_vocabularies_differ(assets: dict[str, Path], tmp_path: Path) -> None:
    alien_data = write_dataset(tmp_path / "alien_data", assets["alien"], n=3)
    build_cache(alien_data, str(assets["alien"]), tmp_path / "cache", top_k=4)
    with pytest.raises(BadInputError, match="KD refused"):
        train(small(assets["student"], teacher_cache=str(tmp_path / "cache")), assets["dataset"], tmp_path / "o")


def test_rows_cut_before_any_trained_token_are_refused_not_trained_on(assets: dict[str, Path], tmp_path: Path) -> None:
    # Every row starts with a masked prompt longer than 3 tokens: cut at 3, nothing is left to train.
    with pytest.raises(BadInputError, match="no trained token within the first 3 tokens"):
        train(small(assets["student"], max_length=3), assets["dataset"], tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_merge_reproduces_base_plus_adapter_logits(assets: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tracegen.distill.merge import merge_adapter

    train(small(assets["student"], max_steps=3), assets["dataset"], tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    ids = torch.tensor([load_rows(assets["dataset"])[0].input_ids])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(assets["student"])), str(tmp_path / "adapter")
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base = AutoModelForCausalLM.from_pretrained(str(assets["student"])).eval()
    with torch.inference_mode():
        want, got, plain = peft_model(ids).logits, merged(ids).logits, base(ids).logits
    assert torch.allclose(want, got, atol=1e-4)
    assert not torch.allclose(plain, got, atol=1e-3)  # the adapter did something


def test_packed_and_unpacked_batches_give_the_same_logits_counts_and_loss(assets: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(assets["student"])).eval()
    rows = load_rows(assets["dataset"])
    indices = [3, 0, 5, 1]  # rows of different lengths
    assert len({len(rows[i].input_ids) for i in indices}) > 1
    padded, packed = collate(rows, indices, 512), collate_packed(rows, indices, 512)
    assert packed.input_ids.shape[0] == 1 and packed.input_ids.shape[1] == sum(len(rows[i].input_ids) for i in indices)
    assert packed.counts() == padded.counts() and sum(packed.counts()) == packed.n_supervised()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        a, b = supervised_logits(model, padded, cpu), supervised_logits(model, packed, cpu)
    assert torch.equal(a.targets, b.targets)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    # Without restarting positions the rows would attend to each other: the check above can fail.
    crossed = packed._replace(position_ids=torch.arange(packed.input_ids.shape[1]).unsqueeze(0))
    with torch.inference_mode():
        assert not torch.allclose(supervised_logits(model, crossed, cpu).logits, a.logits, atol=1e-4)


def test_training_packed_matches_unpacked(assets: dict[str, Path], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    build_cache(assets["dataset"], str(assets["teacher"]), cache_dir, top_k=16, temperature=2.0, batch_size=4)
    runs = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        train(
            small(assets["student"], teacher_cache=str(cache_dir), packing=packing, max_steps=3), assets["dataset"], out
        )
        runs[packing] = read_metrics(out)
    for unpacked, packed in zip(runs[False], runs[True], strict=True):
        assert packed["ce"] == pytest.approx(unpacked["ce"], rel=1e-4)
        assert packed["kd"] == pytest.approx(unpacked["kd"], rel=1e-4)
        assert packed["supervised_tokens"] == unpacked["supervised_tokens"]
        assert packed["tokens"] == unpacked["tokens"]  # no padding either way in the count


def test_packing_is_refused_on_a_linear_attention_model(assets: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3NextConfig

    tokenizer = AutoTokenizer.from_pretrained(str(assets["student"]))
    config = Qwen3NextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, layer_types=["linear_attention", "full_attention"], num_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    )  # fmt: skip
    hybrid = tmp_path / "hybrid"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(hybrid))
    tokenizer.save_pretrained(str(hybrid))
    with pytest.raises(BadInputError, match=r"packing refused: .* linear-attention or recurrent layers"):
        train(small(hybrid, packing=True), assets["dataset"], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing written"


def test_split_method_hf_holds_out_the_rows_datasets_would(assets: dict[str, Path], tmp_path: Path) -> None:
    # 8 rows at 0.3: datasets takes ceil(2.4) = 3 eval rows where the torch split floors to 2.
    config = small(assets["student"], max_steps=1, eval_fraction=0.3, split_method="hf", split_seed=7)
    train(config, assets["dataset"], tmp_path / "out")
    written = json.loads((tmp_path / "out" / "distill_config.json").read_text())
    assert (written["train_rows"], written["eval_rows"]) == (5, 3)
