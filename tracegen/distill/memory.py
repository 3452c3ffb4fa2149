"""The expected peak memory of one training step, per process, from the config and the model's size.

Printed before the student is loaded, so a user learns in seconds that a run will not fit. Terms
(bytes; ``P`` the student's parameters, ``P_t`` the trained ones, ``T`` tokens of a micro-batch,
``N`` its supervised tokens, ``V`` the vocabulary)::

    weights      P x dtype bytes (full: fp32 master weights) + LoRA weights in fp32
    grads        P_t x 4 (fp32); DDP keeps a second copy in its buckets
    optimizer    P_t x 8 (AdamW: two fp32 moments) or P_t x 2 (8-bit AdamW)
    activations  what backward keeps per layer and token (about 6h + 5q + 4kv + 4i values; with
                 gradient checkpointing only the layers' inputs and one layer), plus on CPU the
                 attention probabilities (heads x T per token; GPU kernels keep none)
    loss         the [N, V] fp32 copies of the loss forward and backward: 3 for CE, 4 with KD, 6 with DISC
    runtime      the process itself (Python, torch, transformers; the CUDA context on a GPU)
    temporaries  P_t x 4 while the optimizer steps (torch's multi-tensor AdamW), when activations and
                 loss are already freed: the peak holds the larger of the two

    peak = weights + grads + optimizer + runtime + max(activations + loss, temporaries)

FSDP divides weights, grads and optimizer by the processes (plus one gathered layer).

Not guaranteed: allocator fragmentation, the transient of loading (a checkpoint read while the model
is built), and kernels' workspaces are not modelled; the test holds the estimate to 25% of measured
peak RSS on CPU students from 2 layers to SmolLM2-135M.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from tracegen.config import DistillConfig
from tracegen.distill.lora import resolve_targets

GIB = 1024**3
RUNTIME_BYTES = {"cpu": int(0.55 * GIB), "cuda": int(1.0 * GIB)}


class MemoryEstimate(NamedTuple):
    weights: int
    grads: int
    optimizer: int
    activations: int
    loss: int
    runtime: int
    temporaries: int

    @property
    def total(self) -> int:
        steady = self.weights + self.grads + self.optimizer + self.runtime
        return steady + max(self.activations + self.loss, self.temporaries)

    def line(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in zip(self._fields, self, strict=True))
        return (
            f"expected peak memory per process: {self.total / GIB:.2f} GiB ({parts} GiB; the optimizer's "
            "temporaries reuse what activations and loss free)"
        )


class ModelSize(NamedTuple):
    params: int  # every weight, tied ones once
    lora_params: int  # what the LoRA preset would add
    hidden: int
    layers: int
    intermediate: int
    heads: int
    q_width: int  # heads x head_dim
    kv_width: int  # kv heads x head_dim
    vocab: int
    largest_layer: int  # parameters of the largest decoder layer (an FSDP unit)


def model_size(model_config: Any, config: DistillConfig) -> ModelSize:
    """Parameter counts and shapes of the model ``model_config`` describes, built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # nothing drawn from the run's generator
        model: Any = AutoModelForCausalLM.from_config(model_config)  # type: ignore[no-untyped-call]
    params = sum(p.numel() for p in model.parameters())
    preset = resolve_targets(model.config, config.lora)
    output = model.get_output_embeddings()
    lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if preset.targets == "all-linear" or name.rsplit(".", 1)[-1] in preset.targets:
            lora += config.lora.r * (module.in_features + module.out_features)
    text = model.config.get_text_config()
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    layer_sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in layer_types]
    return ModelSize(
        params=params,
        lora_params=lora,
        hidden=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        intermediate=int(getattr(text, "intermediate_size", 4 * text.hidden_size)),
        heads=heads,
        q_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
        vocab=int(text.vocab_size),
        largest_layer=max(layer_sizes, default=0),
    )


def estimate_peak(
    size: ModelSize,
    config: DistillConfig,
    *,
    weight_bytes: int,
    seq_len: int,
    batch_rows: int,
    supervised: int,
    device_type: str = "cpu",
    processes: int = 1,
    sharded: bool = False,
    bf16_compute: bool = False,
) -> MemoryEstimate:
    """The peak of one step per process, for micro-batches of ``batch_rows`` rows of ``seq_len`` tokens with
    ``supervised`` supervised tokens; ``weight_bytes`` per weight as loaded (full training: fp32)."""
    full = config.method == "full"
    trained = size.params if full else size.lora_params
    weights = size.params * (4 if full else weight_bytes) + (0 if full else size.lora_params * 4)
    grads = trained * 4
    per_moment = 1 if config.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 4
    optimizer = trained * 2 * per_moment
    temporaries = trained * 4
    if sharded and processes > 1:
        gathered = size.largest_layer * (4 if full else weight_bytes)
        weights, grads, optimizer = weights // processes + gathered, grads // processes, optimizer // processes
        temporaries //= processes
    elif processes > 1:
        grads *= 2  # DDP's buckets
    tokens = batch_rows * seq_len
    act_bytes = 2 if bf16_compute else (4 if full else weight_bytes)
    per_layer = 6 * size.hidden + 5 * size.q_width + 4 * size.kv_width + 4 * size.intermediate
    if device_type == "cpu":
        per_layer += size.heads * seq_len
    if config.gradient_checkpointing:
        activations = tokens * act_bytes * (size.layers * size.hidden + per_layer)
    else:
        activations = tokens * act_bytes * size.layers * per_layer
    copies = 6 if config.discrepancy is not None else 4 if config.teacher_cache else 3
    loss = copies * supervised * size.vocab * 4
    runtime = RUNTIME_BYTES.get(device_type, RUNTIME_BYTES["cuda"])
    return MemoryEstimate(weights, grads, optimizer, activations, loss, runtime, temporaries)
