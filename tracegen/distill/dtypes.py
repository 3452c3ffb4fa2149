"""Model dtypes: the names a recipe uses (``distill.model_dtype``) and a checkpoint's own dtype."""

from __future__ import annotations

from typing import Literal

import torch

DtypeName = Literal["auto", "bf16", "fp16", "fp32"]
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def checkpoint_dtype(model: str) -> torch.dtype:
    """The dtype ``model``'s config.json names (fp32 when it names none), read without loading weights."""
    from transformers import AutoConfig

    named = getattr(AutoConfig.from_pretrained(model), "dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) else torch.float32


def resolve_dtype(name: DtypeName, model: str) -> torch.dtype:
    """The torch dtype of ``name``; ``auto`` is the checkpoint's own."""
    return checkpoint_dtype(model) if name == "auto" else TORCH_DTYPES[name]
