"""FSDP for ``tracegen distill``: the student's weights sharded over the processes with PyTorch's FSDP2.

``accelerate launch --use_fsdp`` (or a config with ``distributed_type: FSDP``) asks for it. The
sharding itself is PyTorch's ``fully_shard`` applied here, not accelerate's wrapper: the trainer
calls the decoder and the output layer itself (to run the output layer on supervised positions
only), so the root of the sharding must be the module whose forward does that, the same
``_SupervisedForward`` that DDP wraps. It also works on CPU (gloo), where accelerate turns FSDP off,
so the tests run the production path.

Every decoder layer (the model's ``_no_split_modules``) is one FSDP unit, the rest (embeddings, final
norm, a tied output layer) the root unit. Gradients are reduce-scattered and averaged over the
processes, as DDP's are all-reduced and averaged, so the trainer's loss scaling is the same for both.
Everything that reads or writes whole tensors (adapter, optimizer state) goes through the
functions below, which gather on every process (they are collectives) and return full tensors.
"""

from __future__ import annotations

import os
from typing import Any

import torch

PREFIX = "lm."
"""Where ``_SupervisedForward`` keeps the trained model: names below the root start with it."""


def fsdp_requested(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return accelerator.num_processes > 1 and (launched or accelerator.distributed_type == DistributedType.FSDP)


def shard(root: torch.nn.Module, model: Any) -> tuple[Any, int]:
    """``fully_shard`` every decoder layer of ``model`` (held by ``root``), then ``root`` itself.

    Returns the sharded root and the number of layer units.
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT (LoRA) or plain (full)
    layer_types = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"no decoder layers ({sorted(layer_types) or 'no _no_split_modules'}) to shard")
    for layer in layers:
        fully_shard(layer)
    return fully_shard(root), len(layers)


def full_trainable_state(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors (LoRA's, or every weight), whole, under the model's own state-dict names (a collective)."""
    out = {}
    for name, param in root.named_parameters():
        if param.requires_grad:
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            out[name.removeprefix(PREFIX)] = full.detach().cpu()
    return out


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state, whole and keyed by parameter names (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # A forward (evaluation's) leaves the root unit's weights gathered, registered in place of the shards
    # the optimizer holds; full training trains those weights, and the state dict maps them by identity.
    getattr(root, "reshard", lambda: None)()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_optimizer_state_dict(root, optimizer, options=options))


def load_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Shard a state from :func:`full_optimizer_state` back into ``optimizer`` (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(root, optimizer, state, options=StateDictOptions(full_state_dict=True))


def total_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the sharded gradients to ``max_norm`` over all processes; the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
