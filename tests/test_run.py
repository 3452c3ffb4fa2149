"""`tracegen run`: every seed recipe end to end at smoke scale (offline), resume, and the cards' settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import tracegen
from tracegen.recipe import load_recipe

ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"

# The published cards' settings, as the issue's table gives them (dotted paths into the recipe).
STEM_COMMON: dict[str, Any] = {
    "distill.method": "full",  # the cards are full-parameter fine-tunes
    "format.template": "proof",
    "format.import_format": "cot",
    "format.max_length": 1024,
    "distill.alpha_ce": 0.55,
    "distill.alpha_kd": 0.45,
    "distill.temperature": 2.0,
    "distill.top_k": 64,
    "distill.proof_weight_start": 2.5,
    "distill.proof_weight_end": 1.5,
    "distill.epochs": 1,
    "distill.batch_size": 1,
    "distill.grad_accum": 8,
    "distill.weight_decay": 0.01,
    "distill.learning_rate": 1.5e-5,
    "distill.min_learning_rate": 1e-6,
    "distill.warmup_steps": 30,
    "distill.max_grad_norm": 1.0,
    "distill.precision": "bf16",
    "distill.max_length": 1024,
    "distill.eval_fraction": 0.05,
    "distill.split_method": "hf",  # the card's 5,815 / 307 of 6,122 (tests/test_distill_split.py)
    "distill.seed": 42,
}
CARDS: dict[str, dict[str, Any]] = {
    "qwen3-0.6b-stem-proof-thinking.yaml": {
        **STEM_COMMON,
        "cache_teacher.teacher": "Qwen/Qwen3-30B-A3B-Thinking-2507",
        "distill.student": "Qwen/Qwen3-0.6B",
        "distill.discrepancy": None,
    },
    "qwen3-1.7b-stem-proof-disc.yaml": {
        **STEM_COMMON,
        "cache_teacher.teacher": "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "distill.student": "Qwen/Qwen3-1.7B",
        "distill.discrepancy.jump_amplifier": 3.0,
        "distill.discrepancy.jump_sigma": 2.0,
        "distill.discrepancy.smoothing_window": 3,
        "distill.discrepancy.smoothing_sigma": 1.0,
        "distill.discrepancy.gap_energy_weight": 0.02,
    },
    "qwen3-1.7b-two-stage-legal.yaml": {
        **STEM_COMMON,
        "cache_teacher.teacher": "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "distill.student": "Qwen/Qwen3-1.7B",
        "distill.discrepancy": None,  # stage 1 is recipe 2 without the DISC terms
        "run.probes": ["proof", "instruct"],
        "run.merge_best": True,
        "stage2.data": "Alignment-Lab-AI/Lawyer-Instruct",
        "stage2.format.template": "instruct",
        "stage2.format.max_length": 1024,
        "stage2.distill.method": "full",
        "stage2.distill.epochs": 1,
        "stage2.distill.batch_size": 2,
        "stage2.distill.grad_accum": 4,
        "stage2.distill.learning_rate": 5e-6,
        "stage2.distill.warmup_steps": 30,
        "stage2.distill.max_grad_norm": 1.0,
        "stage2.distill.max_length": 1024,
        "stage2.distill.gradient_checkpointing": True,
        "stage2.distill.eval_every": 200,
    },
    "topological-qwen-dualmind.yaml": {
        "distill.method": "full",
        "format.template": "dualmind",
        "format.examine": "teacher",
        "cache_teacher.teacher": "Qwen/Qwen3-30B-A3B-Thinking-2507",
        "distill.top_k": 64,
        "distill.temperature": 2.0,
        "distill.alpha_kd": 0.45,
        "distill.proof_weight_start": 2.25,
        "distill.proof_weight_end": 1.1,
        "distill.batch_size": 2,
        "distill.grad_accum": 16,
        "distill.learning_rate": 5e-6,
        "distill.min_learning_rate": 5e-7,
        "distill.warmup_steps": 30,
        "distill.weight_decay": 1e-3,
        "distill.max_grad_norm": 1.0,
        "distill.precision": "bf16",
        "distill.kd_alpha_ramp": (0.15, 0.45),
        "distill.topology.jump_sigma": 3.0,
        "distill.topology.jump_weight": 1.25,
        "distill.topology.jump_target": "loss",
        "distill.topology.energy_window": 64,
        "distill.topology.window": 512,
        "distill.topology.min_overlap": 32,
        "distill.topology.max_overlap": 128,
        "distill.topology.curriculum_phases": 4,
        "distill.topology.easiest_fraction": 0.3,
    },
    "qwen3.6-27b-agentic-react-lora.yaml": {
        "collect.runtime": "docker",
        "collect.teacher.temperature": 0.6,
        "collect.teacher.top_p": 0.95,
        "filter.verifiers": ["tests", "judge"],
        "format.template": "chat",
        "distill.student": "Qwen/Qwen3.6-27B",
        "distill.method": "lora",
        "distill.model_dtype": "bf16",  # the card's bf16 base on one 96 GB GPU
        "distill.lora.r": 64,
        "distill.lora.alpha": 128,
        "distill.lora.dropout": 0.05,
        "distill.lora.target_modules": "all-linear",
        "distill.warmup_ratio": 0.03,
        "distill.epochs": 1,
        "distill.optimizer": "paged_adamw_8bit",
        "distill.packing": False,
        "eval.endpoint.temperature": 0.6,
        "eval.endpoint.top_p": 0.95,
        "eval.endpoint.max_tokens": 32000,  # the card's harness: 4 at a time, streamed, 1,800 s, 32,000 tokens
        "eval.endpoint.stream": True,
        "eval.endpoint.timeout_s": 1800,
        "eval.concurrency": 4,
    },
    "qwen3.6-27b-agentic-react-lora-as-released.yaml": {
        "run.stages": ["collect", "format", "distill", "merge", "eval"],  # no filter: no rejection sampling
        "collect.runtime": "simulated",
        "collect.simulator.model": "deepseek-v4-flash",
        "collect.teacher.model": "deepseek-v4-pro",
        "collect.teacher.extra_body": {"thinking": {"type": "enabled"}},  # DeepSeek's documented switch
        "format.template": "chat",
        "format.train_observations": "none",
        "distill.proof_weighting": False,  # plain SFT
        "distill.lora.r": 64,
        "distill.lora.alpha": 128,
        "distill.lora.dropout": 0.05,
        "distill.lora.target_modules": "all-linear",
        "distill.warmup_ratio": 0.03,
        "distill.epochs": 1,
        "distill.optimizer": "paged_adamw_8bit",
        "distill.packing": False,
    },
    "qwen3.6-27b-agentic-react-lora-simulated.yaml": {
        "collect.runtime": "simulated",
        "collect.simulator.model": "deepseek-v4-flash",
        "filter.verifiers": ["replay", "judge"],
        "filter.replay.reject": "material",
        "format.template": "chat",
        "format.train_observations": "none",
        "distill.method": "lora",
        "distill.model_dtype": "bf16",
        "distill.lora.target_modules": "all-linear",
        "distill.warmup_ratio": 0.03,
        "distill.optimizer": "paged_adamw_8bit",
        "distill.packing": False,
    },
}


def dotted(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("name", sorted(CARDS))
def test_recipe_has_the_cards_settings(name: str) -> None:
    recipe = load_recipe(RECIPES / name)
    wrong = {key: dotted(recipe, key) for key, want in CARDS[name].items() if dotted(recipe, key) != want}
    assert not wrong, f"{name} differs from its card: {wrong}"
    assert recipe.smoke is not None, "every seed recipe has a smoke block for CI"


def test_tkd_recipe_names_the_cards_four_sets_and_smoke_reads_local_stand_ins() -> None:
    full = load_recipe(RECIPES / "topological-qwen-dualmind.yaml")
    assert full.run.data is None and full.data.rows is None  # the card's "~1,599" is not an exact count
    assert [s.rows for s in full.data.sources] == [636, 307, 580, 76]  # as the card states each set
    smoke = load_recipe(RECIPES / "topological-qwen-dualmind.yaml", "smoke")
    assert len(smoke.data.sources) == 4 and all(Path(s.path).is_file() for s in smoke.data.sources)
    assert all(s.rows is None for s in smoke.data.sources)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_smoke_block_uses_only_offline_models(path: Path) -> None:
    recipe = load_recipe(path, "smoke") if load_recipe(path).smoke is not None else load_recipe(path)
    offline = ("tiny:", "smollm2", "qwen3")
    models = [recipe.distill.student, recipe.cache_teacher.teacher, recipe.run.serve, recipe.format.tokenizer]
    for model in filter(None, models):
        assert model.startswith(offline) or Path(model).exists(), f"{path.name}: {model} would need a download"


def test_an_empty_mapping_in_the_smoke_block_clears_the_full_scale_one() -> None:
    path = RECIPES / "qwen3.6-27b-agentic-react-lora-as-released.yaml"
    assert load_recipe(path).collect.teacher.extra_body == {"thinking": {"type": "enabled"}}
    assert load_recipe(path, "smoke").collect.teacher.extra_body == {}, "transformers serve refuses the field"


def test_stage_without_its_input_is_refused_with_exit_2(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("# tracegen run r.yaml\nrun:\n  stages: [distill]\n")
    proc = tracegen("run", str(recipe), "--out", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert "the distill stage needs the format stage" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists(), "nothing is written for a run refused up front"


@pytest.mark.parametrize(
    ("stages", "top_logprobs"), [("[format, cache_teacher]", "20"), ("[collect, format, cache_teacher]", "null")]
)
def test_cache_from_api_logprobs_needs_collect_with_top_logprobs(
    tmp_path: Path, stages: str, top_logprobs: str
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"run: {{stages: {stages}, data: d.jsonl}}\n"
        f"collect: {{tasks: t.jsonl, teacher: {{top_logprobs: {top_logprobs}}}}}\n"
        "cache_teacher: {source: collect}\n"
    )
    proc = tracegen("run", str(recipe), "--out", str(tmp_path / "w"))
    assert proc.returncode == 2, proc.stderr
    assert "cache_teacher.source collect reads the top log-probs collect stored" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_smoke_without_a_smoke_block_is_refused(tmp_path: Path) -> None:
    proc = tracegen("run", str(RECIPES / "quickstart.yaml"), "--out", str(tmp_path / "w"), "--scale", "smoke")
    assert proc.returncode == 2 and "no smoke: block" in proc.stderr


def _stages(work: Path) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in json.loads((work / "run.json").read_text())["stages"]}


@pytest.mark.slow
def test_stem_recipe_smoke_runs_every_stage_then_resumes(tmp_path: Path) -> None:
    work = tmp_path / "work"
    recipe = RECIPES / "qwen3-0.6b-stem-proof-thinking.yaml"
    proc = tracegen("run", str(recipe), "--out", str(work), "--scale", "smoke", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _stages(work) == {s: "ran" for s in ("format", "cache_teacher", "distill", "merge", "eval")}
    # The card's evaluation: the proof prompt, greedy, on the rows distill held out (ceil(12 * 0.2) = 3).
    held_out = (work / "eval" / "held-out-tasks.jsonl").read_text().splitlines()
    assert len(held_out) == 3 and all(json.loads(line)["reference"] for line in held_out)
    report = json.loads((work / "eval" / "eval.json").read_text())
    assert report["totals"]["answers"] == 3 and report["sampling"]["temperature"] == 0.0
    assert "with_markers" in report["totals"] and all("markers_missing" in a for a in report["answers"])
    # the card's method: full-parameter, so the distill output is the model and merge links it
    assert not (work / "adapter" / "adapter_config.json").exists()
    assert (work / "merged" / "config.json").is_file()
    assert (work / "merged" / "model.safetensors").samefile(work / "adapter" / "model.safetensors")
    facts = json.loads((work / ".run" / "distill.json").read_text())["facts"]
    assert facts["mode"] == "kd" and facts["steps"] == 3

    # A crash after distill: merge's output and marker are gone. Only merge runs again.
    import shutil

    shutil.rmtree(work / "merged")
    (work / ".run" / "merge.json").unlink()
    again = tracegen("run", str(recipe), "--out", str(work), "--scale", "smoke", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    skipped = {"format": "skipped", "cache_teacher": "skipped", "distill": "skipped", "eval": "skipped"}
    assert _stages(work) == {**skipped, "merge": "ran"}

    # The same work directory with different training settings is refused, not mixed.
    changed = tmp_path / "changed.yaml"
    changed.write_text(recipe.read_text().replace("max_steps: 3", "max_steps: 4"))
    shutil.copytree(RECIPES / "data", tmp_path / "data", dirs_exist_ok=True)  # the recipe's data, folders too
    refused = tracegen("run", str(changed), "--out", str(work), "--scale", "smoke", "--quiet")
    assert refused.returncode == 2 and "finished with different settings" in refused.stderr


@pytest.mark.slow
def test_two_stage_recipe_smoke_keeps_both_prompt_formats(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = tracegen("run", str(RECIPES / "qwen3-1.7b-two-stage-legal.yaml"), "--out", str(work), "--scale", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_stages(work).values()) == {"ran"} and len(_stages(work)) == 8
    probes = {p["template"]: p for p in json.loads((work / "eval" / "probes.json").read_text())["probes"]}
    assert set(probes) == {"proof", "instruct"} and all(p["generated"] for p in probes.values())
    # stage 2 trained the merged stage-1 model, and the final model is stage 2's merge
    trained = json.loads((work / "stage2-adapter" / "distill_config.json").read_text())
    assert Path(trained["student"]) == work / "merged" and trained["config"]["method"] == "full"
    dataset_meta = json.loads((work / "stage2-dataset" / "tracegen.json").read_text())
    assert "instruct" in json.dumps(dataset_meta)


@pytest.mark.slow
def test_as_released_agentic_smoke_trains_every_trajectory_as_plain_sft(tmp_path: Path) -> None:
    from tracegen.store import read_trajectories

    work = tmp_path / "work"
    recipe = RECIPES / "qwen3.6-27b-agentic-react-lora-as-released.yaml"
    proc = tracegen("run", str(recipe), "--out", str(work), "--scale", "smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _stages(work) == {s: "ran" for s in ("collect", "format", "distill", "merge", "eval")}
    trajectories = list(read_trajectories(work / "collect" / "trajectories.jsonl"))
    assert trajectories and all(t.runtime.kind == "simulated" for t in trajectories)
    import pyarrow.parquet as pq

    rows = pq.read_table(sorted((work / "dataset" / "data").glob("*.parquet"))[0]).to_pylist()
    assert {r["id"] for r in rows} == {t.id for t in trajectories}, "no rejection sampling: every trajectory trained"
    metrics = [json.loads(line) for line in (work / "adapter" / "metrics.jsonl").read_text().splitlines()]
    assert [m["proof_weight"] for m in metrics] == [1.0, 1.0, 1.0], "plain SFT"
