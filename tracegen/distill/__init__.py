"""Built-in LoRA distillation: train a student on a formatted dataset's trained tokens.

One concept per module, dependencies pointing down:

- ``losses``   proof-weighted cross-entropy and sparse (top-k + tail) KD; pure torch, no I/O.
- ``cache``    one teacher forward pass over a dataset into memory-mappable top-k shards.
- ``data``     reading a formatted dataset (input_ids / labels / proof_mask) and batching it.
- ``lora``     per-architecture LoRA target presets and the PEFT wrapper.
- ``trainer``  the optimisation loop (AdamW, cosine warmup, accumulation, clipping, checkpoints).
- ``merge``    folding an adapter into its base model.

torch, transformers, peft and datasets are imported by these modules, so import them only inside
the CLI functions that need them (``tracegen --help`` must not load torch).
"""
