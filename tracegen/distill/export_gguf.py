"""A trained (or merged) model as one GGUF file: ``tracegen export gguf MODEL_DIR --type q8_0``.

What llama.cpp's ``convert_hf_to_gguf.py`` does for the seed students' architectures (``llama`` for
SmolLM2, ``qwen2``, ``qwen3``), with the ``gguf`` package alone: the hyper-parameters, the BPE
tokenizer (tokens, merges, special ids, chat template) and the weights under GGUF's tensor names,
llama's q/k rows permuted to GGML's rotary layout. ``--type`` is any type the ``gguf`` package can
quantize to (:data:`TYPES`); 1-D tensors (norms, biases) stay f32 and a matrix whose rows do not
split into the type's blocks falls back to f16, as llama.cpp does.

Not written: the k-quants (Q4_K_M, Q5_K_M, Q6_K, ...) and i-quants, which only llama.cpp's C
quantizer produces: export f16 and run ``llama-quantize`` on it. Not supported: rope scaling,
tokenizers other than byte-level BPE with a known pre-tokenizer, other architectures (refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracegen.errors import BadInputError

ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp's file type for each --type (what `general.file_type` records)
_FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q5_1": "MOSTLY_Q5_1",
    "q5_0": "MOSTLY_Q5_0",
    "q4_1": "MOSTLY_Q4_1",
    "q4_0": "MOSTLY_Q4_0",
    "tq2_0": "MOSTLY_TQ2_0",
    "tq1_0": "MOSTLY_TQ1_0",
    "mxfp4": "MOSTLY_MXFP4_MOE",
}
TYPES = tuple(_FILE_TYPES)
# llama.cpp picks its pre-tokenizer by name; these are the tokenizer.json pre-tokenizers it is known for.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class GgufSummary:
    model: Path
    out: Path
    type: str
    architecture: str
    tensors: int
    f16_fallback: int  # matrices written as f16 because their rows do not split into the type's blocks
    bytes: int


def check_type(qtype: str) -> str:
    """``qtype`` lower-cased, or a BadInputError saying what to do instead."""
    name = qtype.lower()
    if name in TYPES:
        return name
    k_quant = "_k" in name or name.startswith("iq")
    why = " (k-quants and i-quants need llama.cpp's C quantizer)" if k_quant else ""
    raise BadInputError(
        f"--type {qtype}: the gguf package cannot write this type{why}",
        hint=f"use one of {', '.join(TYPES)}"
        + (
            f"; for {qtype.upper()} export f16, then `llama-quantize OUT.gguf OUT-{qtype}.gguf {qtype.upper()}`"
            if k_quant
            else ""
        ),
    )


def _pre_tokenizer(tokenizer_json: dict[str, Any], model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (refused when it is not one we can name)."""
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        raise BadInputError(
            f"{model_dir}/tokenizer.json: not a BPE tokenizer", hint="GGUF export handles byte-level BPE only"
        )
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"  # GPT-2's regex: SmolLM2's tokenizer
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(parts) == 2 and parts[0].get("pattern", {}).get("Regex") == _QWEN2_REGEX and parts[1]["type"] == "ByteLevel":
        return "qwen2"
    raise BadInputError(
        f"{model_dir}/tokenizer.json: pre-tokenizer {json.dumps(pre)[:80]} is not one GGUF export knows",
        hint="use llama.cpp's convert_hf_to_gguf.py for this tokenizer",
    )


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise BadInputError(f"{model_dir}: no tokenizer.json", hint="save the tokenizer next to the model")
    pre = _pre_tokenizer(json.loads(path.read_text(encoding="utf-8")), model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):  # the embedding may be padded past the tokenizer: those ids get placeholders
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _rope_theta(config: Any, model_dir: Path) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":  # transformers 5 keeps rope scaling here too
        raise BadInputError(f"{model_dir}/config.json: rope scaling is not exported", hint="use llama.cpp's converter")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _permute(weights: Any, heads: int) -> Any:
    """HF's rotary layout (halves) to GGML's (interleaved pairs) for llama's q/k rows (as llama.cpp's converter)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def export_gguf(model_dir: Path, out: Path, qtype: str) -> GgufSummary:
    """Write ``model_dir`` (a transformers causal LM folder) to ``out`` as GGUF of type ``qtype``."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    name = check_type(qtype)
    if not (model_dir / "config.json").is_file():
        raise BadInputError(
            f"{model_dir}: no config.json", hint="point at a model folder (e.g. `tracegen distill merge` output)"
        )
    config = AutoConfig.from_pretrained(str(model_dir))
    arch = config.model_type
    if arch not in ARCHITECTURES:
        raise BadInputError(
            f"{model_dir}/config.json: model_type {arch} is not exported",
            hint=f"GGUF export handles {', '.join(ARCHITECTURES)}; use llama.cpp's convert_hf_to_gguf.py",
        )
    if getattr(config, "quantization_config", None) is not None:
        raise BadInputError(f"{model_dir} is quantized", hint="export the full-precision (merged) model")
    theta = _rope_theta(config, model_dir)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    target = gguf.GGMLQuantizationType[name.upper()]
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto")
    tied = bool(getattr(config, "tie_word_embeddings", False))

    fallback = 0
    count = 0
    partial = out.with_name(out.name + ".partial")  # nothing under OUT until the file is whole
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer = gguf.GGUFWriter(str(partial), arch)
        writer.add_name(model_dir.resolve().name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[name]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, model_dir, config.vocab_size)
        for hf_name, tensor in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # GGUF ties by leaving `output` out
            base, _, suffix = hf_name.rpartition(".")
            gguf_name = names.get_name(base)
            if gguf_name is None:
                raise BadInputError(f"{model_dir}: tensor {hf_name} has no GGUF name", hint="use llama.cpp's converter")
            data = tensor.detach().to(torch.float32).numpy()
            if arch == "llama" and base.endswith("self_attn.q_proj"):
                data = _permute(data, heads)
            elif arch == "llama" and base.endswith("self_attn.k_proj"):
                data = _permute(data, kv_heads)
            kind = target
            if data.ndim == 1:
                kind = gguf.GGMLQuantizationType.F32
            elif data.shape[-1] % gguf.GGML_QUANT_SIZES[target][0]:
                kind = gguf.GGMLQuantizationType.F16
                fallback += 1
            writer.add_tensor(
                f"{gguf_name}.{suffix}", gguf.quants.quantize(np.ascontiguousarray(data), kind), raw_dtype=kind
            )
            count += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return GgufSummary(model_dir, out, name, arch, count, fallback, out.stat().st_size)
