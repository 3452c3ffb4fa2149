"""The LoRA adapter: per-architecture target presets and the PEFT wrapper.

Presets (``target_modules: auto``):

- dense transformers (Llama, Qwen2/Qwen3, Mistral, Gemma, Phi-3, SmolLM...): every attention and MLP
  projection, ``q/k/v/o_proj`` and ``gate/up/down_proj``;
- hybrid models with linear-attention or recurrent layers (Qwen3-Next, Qwen3.5/3.6...) and any
  architecture not listed: PEFT's ``all-linear``, i.e. every linear projection.

The output layer (``lm_head``) and the token embeddings are never adapted, tied or not: ``all-linear``
excludes the output layer, and the dense preset names no embedding.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal, NamedTuple

from tracegen.config import LoraSettings

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig, PreTrainedModel

DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DENSE_TYPES = frozenset(
    {"llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3"}
)
NEVER_ADAPTED = ["lm_head", "embed_tokens"]


@contextmanager
def peft_warnings_silenced() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing``: harmless, and not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


class TargetPreset(NamedTuple):
    kind: Literal["dense", "hybrid", "all-linear", "explicit"]
    targets: list[str] | str  # a list of module names, or "all-linear"


def is_hybrid(config: PretrainedConfig) -> bool:
    """True for models with linear-attention / recurrent layers (where packing would leak state)."""
    layer_types = getattr(config, "layer_types", None) or []
    recurrent = {"linear_attention", "mamba", "recurrent", "conv", "ssm"}
    return any(str(t) in recurrent for t in layer_types) or "next" in str(config.model_type)


def resolve_targets(config: PretrainedConfig, settings: LoraSettings) -> TargetPreset:
    if isinstance(settings.target_modules, list):
        bad = [m for m in settings.target_modules if m in NEVER_ADAPTED]
        if bad:
            from tracegen.errors import BadInputError

            raise BadInputError(f"lora.target_modules: {', '.join(bad)} is never adapted (output layer/embeddings)")
        return TargetPreset("explicit", list(settings.target_modules))
    if settings.target_modules == "all-linear":
        return TargetPreset("all-linear", "all-linear")
    if is_hybrid(config):
        return TargetPreset("hybrid", "all-linear")
    if config.model_type in DENSE_TYPES:
        return TargetPreset("dense", list(DENSE_TARGETS))
    return TargetPreset("all-linear", "all-linear")


def wrap_lora(model: PreTrainedModel, settings: LoraSettings, *, announce: bool = True) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (base weights frozen) and print the preset used."""
    from peft import LoraConfig, get_peft_model

    preset = resolve_targets(model.config, settings)
    lora_config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=preset.targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with peft_warnings_silenced():
        peft_model = get_peft_model(model, lora_config)
    if announce:
        trainable, total = peft_model.get_nb_trainable_parameters()
        targets = preset.targets if isinstance(preset.targets, str) else ",".join(preset.targets)
        print(
            f"LoRA r={settings.r} alpha={settings.alpha} dropout={settings.dropout} on {model.config.model_type} "
            f"({preset.kind} preset: {targets}; lm_head/embeddings not adapted): "
            f"{trainable:,} trainable of {total:,} parameters",
            file=sys.stderr,
        )
    return peft_model
