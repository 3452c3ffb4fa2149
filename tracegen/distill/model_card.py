"""The model card of a distilled student, and ``tracegen push --model DIR``.

``DIR`` is what ``tracegen distill`` writes (a LoRA adapter, or a full model) or what ``distill
merge`` writes (a plain transformers model; merge copies the run files next to it). The card is
built with ``huggingface_hub``'s ``ModelCard``/``ModelCardData`` from those run files:
``distill_config.json`` (the recipe), ``metrics.jsonl`` (losses, tokens, time) and, when the run's
``eval/`` folder sits beside ``DIR`` (``tracegen run``'s layout), its ``eval.json``. It replaces the
blank template PEFT saves. Names only: a local path is never written on the card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tracegen.data.hub import METADATA_FILE, public_name
from tracegen.distill.trainer import METRICS
from tracegen.errors import BadInputError

RUN_CONFIG = "distill_config.json"
RUN_FILES = (RUN_CONFIG, METRICS)
EVAL_JSON = "eval.json"  # what `tracegen eval` writes (tracegen.evaluate.EVAL_JSON)
NOT_UPLOADED = {RUN_CONFIG, "README.md"}  # the config holds local paths; the card tells the recipe instead


def run_dir(model_dir: Path) -> Path | None:
    """Where the run files of ``model_dir`` are: the folder itself, or its parent for a ``best/`` model."""
    return next((d for d in (model_dir, model_dir.parent) if (d / RUN_CONFIG).is_file()), None)


def hub_model_id(name: str) -> str | None:
    """A Hub model id for ``name``: an ``ORG/NAME`` id, or the one a Hub cache snapshot path holds."""
    cached = re.search(r"models--([^/\\]+?)--([^/\\]+)", name)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists():
        return name
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return data


def _metrics(folder: Path) -> list[dict[str, Any]]:
    path = folder / METRICS
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def model_card(model_dir: Path, repo_id: str, dataset_id: str | None = None) -> str:
    """The README.md for ``model_dir`` pushed as ``repo_id``."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter = (model_dir / "adapter_config.json").is_file()
    if not adapter and not (model_dir / "config.json").is_file():
        raise BadInputError(
            f"{model_dir}: neither an adapter (adapter_config.json) nor a model (config.json)",
            hint="point at a `tracegen distill` output or a `tracegen distill merge` folder",
        )
    runs = run_dir(model_dir)
    if runs is None:
        raise BadInputError(
            f"{model_dir}: no {RUN_CONFIG} here or in its parent, so the card cannot tell how it was trained",
            hint="push the folder `tracegen distill` wrote (or its merge, made with this version)",
        )
    run = _read_json(runs / RUN_CONFIG)
    cfg = run.get("config") or {}
    student = str(run.get("student") or cfg.get("student") or "")
    base_id = hub_model_id(student)
    dataset_dir = Path(str(run.get("dataset") or ""))
    dataset_meta = _read_json(dataset_dir / METADATA_FILE) if (dataset_dir / METADATA_FILE).is_file() else {}
    dataset_id = dataset_id or dataset_meta.get("hub_repo_id")
    metrics = _metrics(runs)
    evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
    eval_dir = model_dir.parent / "eval"
    if not (eval_dir / EVAL_JSON).is_file():
        eval_dir = runs.parent / "eval"
    eval_report = _read_json(eval_dir / EVAL_JSON) if (eval_dir / EVAL_JSON).is_file() else None

    tags = ["tracegen", "distillation", "reasoning"]
    tags += ["lora"] if cfg.get("method") == "lora" and adapter else []
    tags += ["merged"] if cfg.get("method") == "lora" and not adapter else []
    data = ModelCardData(
        base_model=base_id,
        datasets=[dataset_id] if dataset_id else None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        license=dataset_meta.get("license") if dataset_meta.get("license") not in (None, "other") else None,
    )
    name = repo_id.split("/")[1]
    base_text = f"[`{base_id}`](https://huggingface.co/{base_id})" if base_id else f"`{public_name(student)}`"
    data_text = (
        f"[`{dataset_id}`](https://huggingface.co/datasets/{dataset_id})"
        if dataset_id
        else f"a local dataset `{dataset_meta.get('name') or public_name(str(dataset_dir))}`"
    )
    tracegen = "tracegen"  # no public home to link to yet: a placeholder link would mislead
    if adapter:
        intro = f"A LoRA adapter for {base_text}, distilled with {tracegen} on {data_text}; load it with PEFT (below)."
    elif cfg.get("method") == "lora":
        intro = f"{base_text} with a distilled LoRA adapter merged in, trained with {tracegen} on {data_text}."
    else:
        intro = f"{base_text} fully fine-tuned by distillation with {tracegen} on {data_text}."
    lora = cfg.get("lora") or {}
    recipe = [
        f"- method `{cfg.get('method')}`"
        + (f" (r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')})" if lora else ""),
        f"- objective `{run.get('mode')}`: "
        + (
            f"cross-entropy x {cfg.get('alpha_ce')} + KD (temperature {cfg.get('temperature')}) x {cfg.get('alpha_kd')}"
            if run.get("mode") == "kd"
            else "cross-entropy on the teacher's tokens (no teacher logits)"
        ),
        f"- learning rate {cfg.get('learning_rate')} (cosine to {cfg.get('min_learning_rate')}, "
        f"{run.get('warmup_steps')} warmup steps), batch {cfg.get('batch_size')} x {cfg.get('grad_accum')} "
        f"accumulation, max length {cfg.get('max_length')}, seed {cfg.get('seed')}",
        f"- proof weighting {cfg.get('proof_weight_start')} -> {cfg.get('proof_weight_end')}"
        if cfg.get("proof_weighting")
        else "- proof weighting off",
        f"- {run.get('train_rows')} training rows, {run.get('eval_rows')} held out; {run.get('total_steps')} steps",
    ]
    if metrics:
        first, last = metrics[0], metrics[-1]
        figures = [
            f"- loss {first['loss']:.4f} at step 1 -> {last['loss']:.4f} at step {last['step']}"
            f" of {last['total_steps']}",
            f"- held-out loss: {evals[0]:.4f} first, {min(evals):.4f} best, {evals[-1]:.4f} last"
            if evals
            else "- held-out loss: not measured (no eval rows)",
            f"- {sum(m['supervised_tokens'] for m in metrics):,} supervised tokens of "
            f"{sum(m['tokens'] for m in metrics):,} seen; {last['elapsed_s']:.0f} s of training",
        ]
    else:
        figures = ["- no metrics.jsonl was found: no training figures"]
    if eval_report:
        t = eval_report.get("totals") or {}
        accuracy = "n/a (no references)" if t.get("accuracy") is None else f"{t['accuracy']:.1%}"
        eval_text = (
            f"`tracegen eval` ({t.get('questions')} questions, {t.get('answers')} answers): accuracy {accuracy} "
            f"({t.get('correct')}/{t.get('scored')} scored), converged {t.get('converged')}, "
            f"hit the length cap {t.get('hit_length')}, median completion {t.get('median_completion_tokens')} tokens."
        )
    else:
        eval_text = "No `tracegen eval` results were found next to this model."
    load = (
        f'from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")'
        if adapter
        else f'from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("{repo_id}")'
    )
    body = f"""
# {name}

{intro}

## Recipe

{chr(10).join(recipe)}

## Training

{chr(10).join(figures)}

## Evaluation

{eval_text}

## Use

```python
{load}
```
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def push_model(
    model_dir: Path, repo_id: str, private: bool, dataset_id: str | None = None, retry_wait_s: float = 2.0
) -> str:
    """Upload the model (or adapter) files with their card as a model repo; returns its URL."""
    from tracegen.data.hub_upload import check_repo_id, hub_token, upload

    token = hub_token()
    check_repo_id(repo_id)
    if dataset_id is not None:
        check_repo_id(dataset_id)
    card = model_card(model_dir, repo_id, dataset_id)
    files: dict[str, Path | bytes] = {
        p.name: p
        for p in model_dir.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in NOT_UPLOADED
    }
    files["README.md"] = card.encode("utf-8")
    upload(
        repo_id,
        "model",
        files,
        private=private,
        message="tracegen: distilled model",
        token=token,
        retry_wait_s=retry_wait_s,
    )
    return f"https://huggingface.co/{repo_id}"
