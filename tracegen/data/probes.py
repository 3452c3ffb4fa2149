"""Prompt-format probes: does a trained model still generate from each training template's prompt?

A two-stage run (proof-format distillation, then instruction SFT) must not lose the first format. A
probe renders a question into a template's prompt part (everything before the trained text), greedily
generates a few tokens with the local model, and records what came out. It checks that the format
*generates* (non-empty, not only EOS), not that the answer is right.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tracegen.data.templates import prompt_part

PROBE_QUESTION = "Show that the sum of two even integers is even."


@dataclass(frozen=True)
class ProbeResult:
    template: str
    prompt: str
    completion: str
    new_tokens: int
    generated: bool  # at least one token that is not EOS and decodes to visible text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_probes(model_dir: Path, templates: list[str], max_new_tokens: int = 24) -> list[ProbeResult]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    results = []
    for template in templates:
        prompt = prompt_part(template, PROBE_QUESTION)
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        text = str(tokenizer.decode(new, skip_special_tokens=True))
        visible = [t for t in new if t != tokenizer.eos_token_id]
        results.append(ProbeResult(template, prompt, text, len(new), bool(visible) and bool(text.strip())))
    return results
