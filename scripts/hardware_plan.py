"""The README's hardware plan: expected peak memory per GPU of every seed recipe at full scale, LoRA and full.

    .venv/bin/python scripts/hardware_plan.py

From ``tracegen.distill.memory`` (the estimate ``tracegen distill`` prints before training) and the
students' published config.json shapes, written out below (nothing is downloaded). Qwen3.6-27B's
config (a linear/full-attention hybrid) is not available offline: a dense Qwen3 of 27B parameters
stands in for it. The worst micro-batch is assumed: every token of ``max_length`` (TKD: of a
window) supervised. The teacher cache (one bf16 forward of the 30B-A3B teacher, about 61 GB of
weights) is a separate step and is not in the table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from transformers import Qwen3Config

from tracegen.config import load_recipe
from tracegen.distill.memory import GIB, estimate_peak, model_size

STUDENTS: dict[str, dict[str, Any]] = {  # config.json of each model card
    "Qwen/Qwen3-0.6B": {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "Qwen/Qwen3-1.7B": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                        "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "Qwen/Qwen3.6-27B": {"hidden_size": 5120, "intermediate_size": 21504, "num_hidden_layers": 64,
                         "num_attention_heads": 40, "num_key_value_heads": 8, "tie_word_embeddings": False},
}  # fmt: skip
RECIPES = [
    "qwen3-0.6b-stem-proof-thinking.yaml",
    "qwen3-1.7b-stem-proof-disc.yaml",
    "qwen3-1.7b-two-stage-legal.yaml",
    "topological-qwen-dualmind.yaml",
    "qwen3.6-27b-agentic-react-lora.yaml",
]
RECIPE_DIR = Path(__file__).parent.parent / "recipes"
GPU_GIB = 80  # an 80 GB card (H100/A100); the 96 GB card of the agentic card fits the same plans


def gpus_needed(size: Any, config: Any, shape: dict[str, Any]) -> tuple[int, float]:
    """Fewest processes (1, or FSDP over 2, 4, 8...) whose per-GPU peak fits ``GPU_GIB``; that peak in GiB."""
    for n in (1, 2, 4, 8, 16):
        peak = estimate_peak(size, config, processes=n, sharded=n > 1, **shape).total / GIB
        if peak < 0.9 * GPU_GIB:
            return n, peak
    return math.inf, peak  # type: ignore[return-value]


def main() -> None:
    print("| recipe (stage) | student | method | micro-batch | peak GiB (1 GPU) | GPUs of 80 GB | launch |")
    print("|---|---|---|---|---:|---:|---|")
    for name in RECIPES:
        recipe = load_recipe(RECIPE_DIR / name)
        stages = [("1", recipe.distill, recipe.distill.student)]
        if recipe.stage2 is not None:
            stages.append(("2", recipe.stage2.distill, recipe.distill.student))
        for stage, distill, student in stages:
            shape_config = Qwen3Config(vocab_size=151_936, head_dim=128, **STUDENTS[str(student)])
            seq = distill.topology.window if distill.topology is not None else distill.max_length
            for method in ("lora", "full"):
                config = distill.model_copy(update={"method": method})
                if stage == "2":  # stage 2 has no teacher cache
                    config = config.model_copy(update={"teacher_cache": None})
                elif "cache_teacher" in recipe.run.stages:
                    config = config.model_copy(update={"teacher_cache": "teacher-cache"})
                size = model_size(shape_config, config)
                dtype_bytes = 4 if config.model_dtype == "fp32" else 2  # auto: the bf16 checkpoints
                rows = config.batch_size
                shape = {"weight_bytes": dtype_bytes, "seq_len": seq, "batch_rows": rows, "supervised": seq * rows,
                         "device_type": "cuda", "bf16_compute": True}  # fmt: skip
                one = estimate_peak(size, config, **shape).total / GIB
                n, peak = gpus_needed(size, config, shape)
                used = " (recipe)" if method == distill.method else ""
                launch = (
                    "`tracegen run`"
                    if n == 1
                    else f"`accelerate launch --use_fsdp --fsdp_version 2 --num_processes {n}` ({peak:.0f} GiB each)"
                )
                print(
                    f"| {name.removesuffix('.yaml')} ({stage}) | {student} | {method}{used} | "
                    f"{config.batch_size} x {seq} | {one:.1f} | {n} | {launch} |"
                )


if __name__ == "__main__":
    main()
