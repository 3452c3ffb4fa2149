"""``tracegen export``: publish a model in another format.

    tracegen export gguf MODEL_DIR --type q8_0 [--out FILE.gguf]

The result goes to stdout as one JSON object; a type the ``gguf`` package cannot write is refused
(exit 2) before anything is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

export_app = typer.Typer(
    help="Publish a model in another format: `tracegen export gguf MODEL_DIR --type q8_0`.", no_args_is_help=True
)


@export_app.command("gguf")
def gguf_command(
    model_dir: Annotated[
        Path, typer.Argument(help="A transformers model folder (e.g. `tracegen distill merge` output).")
    ],
    qtype: Annotated[
        str, typer.Option("--type", "-t", help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, tq2_0, tq1_0, mxfp4.")
    ] = "f16",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="The .gguf file (default MODEL_DIR/NAME-TYPE.gguf).")
    ] = None,
) -> None:
    """Write MODEL_DIR (llama/SmolLM2, qwen2, qwen3) as one GGUF file for llama.cpp and its kin."""
    from tracegen.distill.export_gguf import check_type, export_gguf

    name = check_type(qtype)  # refuse before loading torch
    target = out or model_dir / f"{model_dir.resolve().name}-{name}.gguf"
    summary = export_gguf(model_dir, target, name)
    typer.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(summary).items()}, indent=2))
