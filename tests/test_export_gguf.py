"""GGUF export round trip: write each type, load it back with transformers' GGUF loader, compare logits."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tracegen.distill.export_gguf import TYPES, export_gguf

from .conftest import tracegen
from .distill_fixtures import CORPUS, save_model

# Max |logit difference| allowed per type, as a fraction of the largest |logit|: the float types
# round, the block quantizers lose more the fewer bits they keep; ternary and fp4 are for weights made
# for them (BitNet, gpt-oss experts) and only have to load.
TOLERANCE = {
    "f32": 1e-5,
    "f16": 0.002,
    "bf16": 0.01,
    "q8_0": 0.03,
    "q5_1": 0.15,
    "q5_0": 0.15,
    "q4_1": 0.3,
    "q4_0": 0.3,
}


def _load_gguf(path: Path) -> Any:
    """The GGUF through transformers' loader (head_dim from the file: transformers reads it for llama only)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config.head_dim = int(reader.fields[f"{arch}.attention.key_length"].contents())
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
    )


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_every_type_round_trips_through_transformers(arch: str, tmp_path: Path) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = save_model(tmp_path / "model", arch=arch, seed=3, init_range=0.02)  # a trained model's scale
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    prompts = [tokenizer(text, return_tensors="pt")["input_ids"] for text in CORPUS[:3]]
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    with torch.no_grad():
        expected = [model(ids).logits for ids in prompts]
    scale = max(float(logits.abs().max()) for logits in expected)
    for qtype in TYPES:
        summary = export_gguf(source, tmp_path / f"{qtype}.gguf", qtype)
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]][0]
        assert (summary.f16_fallback > 0) == (block > 32)  # rows of 32 and 64 weights: 256-blocks do not fit
        loaded = _load_gguf(summary.out)
        with torch.no_grad():
            diff = max(
                float((loaded(ids).logits - ref).abs().max()) for ids, ref in zip(prompts, expected, strict=True)
            )
        print(f"{arch} {qtype}: max |logit diff| {diff:.5f} of max |logit| {scale:.3f}", file=sys.stderr)
        assert diff < TOLERANCE.get(qtype, float("inf")) * scale, (qtype, diff)
    assert not list(tmp_path.glob("*.partial"))


def test_tokenizer_survives_the_round_trip(tmp_path: Path) -> None:
    import gguf

    source = save_model(tmp_path / "model", vocab_size=400, arch="qwen3")  # past the 259 bytes+specials: merges
    path = export_gguf(source, tmp_path / "m.gguf", "f16").out
    fields = gguf.GGUFReader(str(path)).fields
    from transformers import AutoTokenizer

    ours, back = (
        AutoTokenizer.from_pretrained(str(source)),
        AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf"),
    )
    for text in CORPUS:
        assert back(text)["input_ids"] == ours(text)["input_ids"]
    assert fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == ours.eos_token_id


def test_cli_writes_the_file_and_refuses_k_quants(tmp_path: Path) -> None:
    source = save_model(tmp_path / "model", arch="llama")
    refused = tracegen("export", "gguf", str(source), "--type", "q4_k_m")
    assert refused.returncode == 2
    assert "Error: --type q4_k_m: the gguf package cannot write this type" in refused.stderr
    assert "llama-quantize" in refused.stderr and not list(source.glob("*.gguf"))
    written = tracegen("export", "gguf", str(source), "--type", "q8_0")
    assert written.returncode == 0, written.stderr
    assert (source / "model-q8_0.gguf").stat().st_size > 0
