"""Folding a LoRA adapter into its base model: ``tracegen distill merge ADAPTER_DIR --out MODEL_DIR``.

The base is the adapter's ``base_model_name_or_path`` (or ``base``), loaded in fp32 for the merge;
merging into a quantized base is refused (the rounding would change the model). The merged folder is
a plain transformers model in the base's own dtype (bf16 for a bf16 base), whose logits equal
base+adapter up to that dtype's rounding; the tokenizer saved with the adapter is copied next to it.

A full-parameter output (``distill.method: full``) is already the model: merging it links its files
into ``MODEL_DIR`` (hard links where the filesystem allows, else copies), so pipelines treat both
methods alike.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracegen.distill.dtypes import checkpoint_dtype
from tracegen.distill.lora import peft_warnings_silenced
from tracegen.errors import BadInputError
from tracegen.store import staged_dir


@dataclass(frozen=True)
class MergeSummary:
    adapter: Path
    base: str
    out: Path


def merge_adapter(adapter_dir: Path, out: Path, base: str | None = None) -> MergeSummary:
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_path = adapter_dir / "adapter_config.json"
    if is_full_model(adapter_dir):  # nothing to fold in: the folder is the model
        link_model(adapter_dir, out)
        return MergeSummary(adapter_dir, str(adapter_dir), out)
    if not config_path.is_file():
        raise BadInputError(f"{adapter_dir}: no adapter_config.json", hint="point at a `tracegen distill` output")
    base_name = base or json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base_name:
        raise BadInputError(f"{config_path}: no base_model_name_or_path", hint="pass --base MODEL")
    if getattr(AutoConfig.from_pretrained(base_name), "quantization_config", None) is not None:
        raise BadInputError(f"{base_name} is quantized: merge into the full-precision base", hint="pass --base MODEL")
    model: Any = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    with peft_warnings_silenced():
        merged: Any = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.to(checkpoint_dtype(base_name))  # merged in fp32, written in the base's dtype
    tok_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base_name)
    with staged_dir(out) as tmp:  # an interrupted merge leaves no half-written model under OUT
        merged.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(tok_source)).save_pretrained(str(tmp))
        copy_run_files(adapter_dir, tmp)
    return MergeSummary(adapter_dir, str(base_name), out)


def is_full_model(folder: Path) -> bool:
    """True for a ``distill.method: full`` output (or its ``best/``): a model folder, not an adapter."""
    return (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file()


def link_model(folder: Path, out: Path) -> None:
    """The model files of ``folder`` (not its checkpoint or best model) in ``out``: hard links, else copies."""
    with staged_dir(out) as tmp:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                try:
                    os.link(path, tmp / path.name)
                except OSError:  # another filesystem, or links not allowed
                    shutil.copy2(path, tmp / path.name)
        copy_run_files(folder, tmp)


def copy_run_files(model_dir: Path, out: Path) -> None:
    """The run's recipe and metrics beside the merged model (a ``best/`` model's are in its parent), for its card."""
    from tracegen.distill.model_card import RUN_FILES, run_dir

    runs = run_dir(model_dir)
    if runs is None:
        return
    for name in RUN_FILES:
        if (runs / name).is_file() and not (out / name).exists():
            shutil.copy2(runs / name, out / name)
