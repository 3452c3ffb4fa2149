"""A Hub-ready dataset folder: parquet shards, ``tracegen.json`` metadata, a dataset card; and ``push``.

Layout (``datasets.load_dataset(DATASET_DIR)`` loads it; TRL's ``SFTTrainer`` trains on it as is,
because rows carry pre-tokenized ``input_ids`` and ``labels``)::

    DATASET_DIR/README.md                              card: YAML metadata + provenance
    DATASET_DIR/tracegen.json                          tokenizer (name, vocabulary hash), policy, stats
    DATASET_DIR/data/train-00000-of-0000N.parquet      the rows
    DATASET_DIR/sharegpt/train-00000-of-00001.parquet  with --export sharegpt
    DATASET_DIR/dataset_info.json                      with --export sharegpt: LLaMA-Factory's entry for it

The folder is written into a temporary sibling and renamed into place, so a failure never leaves a
half-written dataset (an existing ``DATASET_DIR`` is replaced only once the new one is complete).
Tool-call arguments and the ``tools`` list are JSON strings: as Arrow structs, the schemas of
different tools would merge and gain ``null`` keys, which changes the rendered prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tracegen.errors import BadInputError
from tracegen.store import staged_dir, write_atomic, write_json_atomic

METADATA_FILE = "tracegen.json"


def _list_array(arrays: Sequence[Any], pa_type: Any) -> Any:
    import pyarrow as pa

    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int32, count=len(arrays))
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64))).astype(np.int32)
    values = np.concatenate(arrays) if len(arrays) else np.zeros(0)
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(np.asarray(values).astype(pa_type.to_pandas_dtype()), pa_type)
    )


SPAN_FIELDS = [
    ("start", "int32"),
    ("end", "int32"),
    ("kind", "string"),
    ("train", "bool_"),
    ("source", "string"),
    ("weight_class", "string"),
]


def _spans_array(per_row: Sequence[Sequence[Any]], span_type: Any) -> Any:
    """The spans column built field by field (rows hold ``Span`` objects): no dict per span."""
    import pyarrow as pa

    flat = [sp for spans in per_row for sp in spans]
    fields = pa.StructArray.from_arrays(
        [pa.array([getattr(sp, name) for sp in flat], getattr(pa, t)()) for name, t in SPAN_FIELDS],
        fields=list(span_type.value_type),
    )
    offsets = np.concatenate(([0], np.cumsum([len(spans) for spans in per_row]))).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), fields, type=span_type)


def rows_table(rows: Sequence[dict[str, Any]]) -> Any:
    """Rows (from :func:`tracegen.data.format.build_rows`) as one Arrow table with a fixed schema."""
    import pyarrow as pa

    span_type = pa.list_(pa.struct([(n, getattr(pa, t)()) for n, t in SPAN_FIELDS]))
    function_type = pa.struct([("name", pa.string()), ("arguments", pa.string())])
    call_type = pa.list_(pa.struct([("id", pa.string()), ("type", pa.string()), ("function", function_type)]))
    message_type = pa.list_(
        pa.struct(
            [
                ("role", pa.string()),
                ("content", pa.string()),
                ("reasoning_content", pa.string()),
                ("tool_calls", call_type),
                ("tool_call_id", pa.string()),
                ("name", pa.string()),
                ("observation_source", pa.string()),
            ]
        )
    )
    scalar_cols: dict[str, Any] = {
        "id": pa.string(),
        "template": pa.string(),
        "text": pa.string(),
        "task_id": pa.string(),
        "sample_index": pa.int32(),
        "teacher_model": pa.string(),
        "runtime": pa.string(),
        "stop_reason": pa.string(),
        "critique": pa.string(),
        "tools": pa.string(),
        "num_tokens": pa.int32(),
        "num_trained": pa.int32(),
        "truncated": pa.bool_(),
    }
    columns: dict[str, Any] = {name: pa.array([r[name] for r in rows], t) for name, t in scalar_cols.items()}
    columns["spans"] = _spans_array([r["spans"] for r in rows], span_type)
    columns["messages"] = pa.array([r["messages"] for r in rows], message_type)
    columns["input_ids"] = _list_array([r["input_ids"] for r in rows], pa.int32())
    columns["labels"] = _list_array([r["labels"] for r in rows], pa.int32())
    # all ones (no padding in a row): axolotl and other pre-tokenised loaders expect the column beside input_ids
    columns["attention_mask"] = pa.ListArray.from_arrays(
        columns["input_ids"].offsets, pa.array(np.ones(len(columns["input_ids"].values), np.int8), pa.int8())
    )
    columns["proof_mask"] = _list_array([r["proof_mask"] for r in rows], pa.int8())
    order = ["id", "template", "text", "spans", "input_ids", "attention_mask", "labels", "proof_mask", "messages"]
    order += ["tools"]
    order += [c for c in columns if c not in order]
    return pa.table({c: columns[c] for c in order})


def write_shards(table: Any, folder: Path, shard_rows: int) -> list[str]:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    n = max(1, -(-table.num_rows // shard_rows))
    names = []
    for i in range(n):
        name = f"train-{i:05d}-of-{n:05d}.parquet"
        pq.write_table(table.slice(i * shard_rows, shard_rows), folder / name, compression="zstd")
        names.append(name)
    return names


def save_dataset(
    out: Path,
    table: Any,
    metadata: dict[str, Any],
    shard_rows: int,
    extra_tables: dict[str, Any] | None = None,
    json_files: dict[str, Any] | None = None,
) -> None:
    """Write the whole folder in a temporary sibling, then swap it into place (``store.staged_dir``).

    The card is built last, from ``metadata`` plus what was written (``metadata["configs"]``: each
    folder's features and sizes, which ``push`` reuses to rebuild the card without reading shards).
    """
    metadata["name"] = out.name
    metadata["configs"] = {}
    with staged_dir(out.resolve()) as tmp:
        for name, folder, tab in [("default", "data", table), *((n, n, t) for n, t in (extra_tables or {}).items())]:
            files = [tmp / folder / f for f in write_shards(tab, tmp / folder, shard_rows)]
            info = _dataset_info(tab, files, shard_rows)
            metadata["configs"][name] = {"path": f"{folder}/train-*.parquet", "dataset_info": info}
        for name, content in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(dataset_card(metadata), encoding="utf-8")


def _dataset_info(table: Any, files: list[Path], shard_rows: int) -> dict[str, Any]:
    """The card's ``dataset_info`` for one config, as ``datasets`` itself writes it (features, splits, sizes)."""
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from huggingface_hub import DatasetCardData

    # Arrow's size depends on how the table is chunked (one offsets entry and bitmap per chunk), which
    # depends on format's worker count: measured shard by shard, each shard in one chunk, it does not.
    size = sum(
        table.slice(start, shard_rows).combine_chunks().nbytes for start in range(0, max(table.num_rows, 1), shard_rows)
    )
    splits = SplitDict()
    splits.add(SplitInfo(name="train", num_bytes=size, num_examples=table.num_rows))
    info = DatasetInfo(
        features=Features.from_arrow_schema(table.schema),
        splits=splits,
        download_size=sum(f.stat().st_size for f in files),
        dataset_size=size,
    )
    card_data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    return dict(card_data["dataset_info"])


def load_metadata(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / METADATA_FILE
    if not path.is_file():
        raise BadInputError(
            f"{dataset_dir}: not a tracegen dataset (no {METADATA_FILE})", hint="make one with `tracegen format`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BadInputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return data


def read_rows(dataset_dir: Path, columns: list[str] | None = None) -> Any:
    """The ``data/`` shards as one Arrow table."""
    import pyarrow.parquet as pq

    files = sorted((dataset_dir / "data").glob("*.parquet"))
    if not files:
        raise BadInputError(f"{dataset_dir}: no data/*.parquet shards")
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


# ---------------------------------------------------------------------------------------------------
# The dataset card


KIND_NAMES = {
    "reasoning": "reasoning",
    "tool_call": "tool calls",
    "answer": "answer",
    "critique": "critique",
    "template": "the template text the student must generate (and the closing EOS)",
}


def _trained_and_dropped(meta: dict[str, Any]) -> tuple[str, str]:
    """What the rows train (from the token counts, not a promise), and what the template left out of the text."""
    stats = meta["stats"]
    trained = [name for kind, name in KIND_NAMES.items() if stats["kind_trained"].get(kind)]
    lost = {
        "reasoning": stats.get("reasoning_dropped_by_template", 0),
        "tool_calls": stats.get("tool_calls_dropped_by_template", 0),
    }
    cannot = meta.get("template_cannot_render") or []
    permitted = (meta.get("policy") or {}).get("allow_dropped") or []
    parts = [f"{n:,} {k.replace('_', ' ')} block(s)" for k, n in lost.items() if n]
    if meta.get("template") == "instruct":
        dropped = "Not in the text, by the template's design: reasoning and tool calls (instruct trains the answer)."
    elif parts or cannot:
        dropped = (
            "**Left out of the text by the chat template**"
            + (f" (it cannot render {' or '.join(c.replace('_', ' ') for c in cannot)})" if cannot else "")
            + f": {', '.join(parts) or 'none in these samples'}; permitted with "
            f"`--allow-dropped {','.join(permitted)}`. The student is not trained on them."
        )
    else:
        dropped = "Nothing the trajectories had was left out of the text by the template."
    return ", ".join(trained) or "nothing", dropped


SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
SIZE_CATEGORIES += [(10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` rows."""
    return next((name for bound, name in SIZE_CATEGORIES if n < bound), "n>1B")


def public_name(name: str) -> str:
    """A model, tokenizer or file named on a public card: a Hub id as it is, a local path by its last part."""
    if name.startswith(("/", "~", "./", "../", "\\")) or (len(name) > 2 and name[1] == ":" and name[2] in "/\\"):
        return Path(name.replace("\\", "/")).name or name
    return name


def _public_paths(value: Any) -> Any:
    """``value`` (JSON) with every string that is a local path reduced to its last part (:func:`public_name`)."""
    if isinstance(value, dict):
        return {k: _public_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public_paths(v) for v in value]
    return public_name(value) if isinstance(value, str) else value


def _sampling_text(teacher: dict[str, Any]) -> str:
    sampling = teacher["sampling"]
    if sampling is None:
        return "imported: the sampling settings are unknown"
    if isinstance(sampling, str):  # a tracegen.json written before sampling was recorded as a dict
        return f"sampling {sampling}"
    sent = ", ".join(f"{k}={v}" for k, v in sampling.items())
    return f"sent {sent}" if sent else "no sampling settings sent (the server's defaults)"


def dataset_card(meta: dict[str, Any], repo_id: str | None = None) -> str:
    """The README.md: Hub metadata (``DatasetCardData``), then provenance taken from the records themselves.

    Names only, never local paths: the card is public once pushed.
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    stats = meta["stats"]
    prov = meta["provenance"]
    tok = meta["tokenizer"]
    imported = prov.get("imported_from")
    pretty_name = (repo_id.split("/")[1] if repo_id else meta.get("name")) or "tracegen dataset"
    tags = ["tracegen", "distillation", "reasoning", "synthetic"]
    if prov["observations"]:
        tags.append("tool-use")
    license_fields = {}
    if meta["license"] == "other":
        license_fields = {"license_name": meta.get("license_name"), "license_link": meta.get("license_link")}
    configs = meta.get("configs") or {}
    data = DatasetCardData(
        license=meta["license"],
        **{k: v for k, v in license_fields.items() if v},
        pretty_name=pretty_name,
        language=["en"],
        task_categories=["text-generation"],
        size_categories=[size_category(stats["samples"])],
        source_datasets=[public_name(imported)] if imported else None,
        tags=tags,
        configs=[
            {
                "config_name": name,
                **({"default": True} if name == "default" else {}),
                "data_files": [{"split": "train", "path": c["path"]}],
            }
            for name, c in configs.items()
        ]
        or None,
        dataset_info=[{"config_name": name, **c["dataset_info"]} for name, c in configs.items()] or None,
    )
    obs = prov["observations"]
    n_obs = sum(obs.values())
    runtime_line = (
        "no tool calls (chain-of-thought only)"
        if not n_obs
        else ", ".join(f"{obs.get(k, 0)} {k}" for k in ("executed", "simulated", "error") if obs.get(k))
        + f" observations ({obs.get('executed', 0) / n_obs:.0%} executed in a sandbox)"
    )
    teachers = "\n".join(
        f"  - `{public_name(t['model'])}` ({t['samples']} samples; {_sampling_text(t)})" for t in prov["teachers"]
    )
    kinds = "\n".join(
        f"| {k} | {stats['kind_tokens'][k]:,} | {stats['kind_trained'][k]:,} |"
        for k in stats["kind_tokens"]
        if stats["kind_tokens"][k]
    )
    filt = prov.get("filter")
    if filt:
        checks = "\n".join(f"- `{c}`: {v}" for c, v in sorted(filt.get("checks", {}).items())) or "- (none listed)"
        summary = ", ".join(public_name(part) for part in str(filt.get("summary", "see report")).split(", "))
        filter_text = (
            f"Filtered with `tracegen filter`: {summary}.\n"
            "Verdict checks recorded on the kept "
            f"samples (passed / total):\n{checks}"
        )
    else:
        filter_text = "No filter report was found next to the input: acceptance rates are unknown."
    policy = meta["policy"]
    origin = (
        f"chain-of-thought imported from `{public_name(imported)}` (not sampled by tracegen)"
        if imported
        else "collected trajectories"
    )
    template_text = meta["template_text"]
    trained_kinds, dropped_text = _trained_and_dropped(meta)
    overflow_text = (
        f"Longer than {policy.get('max_length') or '(no limit)'} tokens (overflow `{policy.get('overflow', 'drop')}`):"
    )
    max_length = max(meta.get("longest_sample") or 0, policy.get("max_length") or 0) or 1024
    trained_frac = stats["trained"] / max(1, stats["tokens"])
    exports = "".join(
        f"\n- `{name}`: `{c['path']}`"
        + (
            " (ShareGPT rows; LLaMA-Factory's entry in `dataset_info.json`)"
            if name == "sharegpt"
            else " (the rows below)"
        )
        for name, c in configs.items()
    )
    body = f"""
# {pretty_name}

Reasoning and tool-use traces for distilling a student, made with
tracegen `{meta["tracegen_version"]}` from {prov["samples_in"]} input records ({origin}).
{stats["samples"]} samples kept after formatting. Configs (`load_dataset(..., name)`):{exports or " default"}

## Provenance

- Teacher models:
{teachers or "  - (none recorded)"}
- Runtime: {runtime_line}.
- Simulator models: {", ".join(public_name(s) for s in prov["simulators"]) or "none"}.
- Stop reasons of the input: {json.dumps(prov["stop_reasons"])}.
- Critiques (dualmind): {prov.get("critiques") or "not used"}.

{filter_text}

## Template and mask policy

Template `{meta["template"]}`:

```
{template_text}
```

Trained: {trained_kinds}. Masked (label -100): template text of the prompt, system, prompt, and observations
({policy["train_observations"]!r} observations trained; simulated tool output is never trained).
A token that straddles a trained and a masked span is masked ({stats["straddled"]:,} such tokens).

| kind | tokens | trained |
|---|---:|---:|
{kinds}

{dropped_text}

{stats["tokens"]:,} tokens, {stats["trained"]:,} trained ({trained_frac:.1%}).
{overflow_text} {stats["truncated"]} samples
truncated (they train on their beginning; column `truncated`), {stats["dropped_too_long"]} dropped because the answer
would be cut;
{stats["dropped_no_answer"]} without a final answer,
{stats["dropped_no_trained"]} with nothing to train,
{stats.get("dropped_no_critique", 0)} with an empty critique (dualmind: never trained as an empty block).

Tokenizer: `{public_name(tok["name"])}` (vocabulary hash `{tok["vocab_hash"]}`, {tok["vocab_size"]:,} tokens).

## Columns

`text` and its character `spans` (`start`, `end`, `kind`, `train`, `source`, `weight_class`);
`input_ids`, `attention_mask` (all ones), `labels` (-100 where masked), `proof_mask` (1 on derivation
tokens); `messages` (OpenAI chat shape: `tool_calls` as `{{id, type: "function", function: {{name, arguments}}}}`
with arguments as JSON strings, reasoning in `reasoning_content`), `tools` (JSON string); provenance columns.

## Use

```python
from datasets import load_dataset
ds = load_dataset("{repo_id or "path/to/DATASET_DIR"}", split="train")

from trl import SFTConfig, SFTTrainer  # pre-tokenized: input_ids + labels are used as they are
trainer = SFTTrainer(model="<student>", train_dataset=ds.select_columns(["input_ids", "labels"]),
                     args=SFTConfig(output_dir="out", max_length={max_length}))  # longest row (TRL's default: 1024)
trainer.train()
```

Audit which tokens are trained: `tracegen audit DATASET_DIR --html audit.html`.
"""
    return str(DatasetCard(f"---\n{data.to_yaml()}\n---\n{body}"))


# ---------------------------------------------------------------------------------------------------
# push


def push_dataset(dataset_dir: Path, repo_id: str, private: bool, retry_wait_s: float = 2.0) -> str:
    """Upload the folder as a dataset repo, its card rebuilt for ``repo_id`` and sent as bytes.

    Checks everything before any network call (a token, an ``ORG/NAME`` id, a complete folder). The
    local README.md is replaced only once the Hub has accepted the commit. Returns the dataset URL.
    """
    from tracegen.data.hub_upload import check_repo_id, hub_token, upload

    token = hub_token()
    check_repo_id(repo_id)
    meta = load_metadata(dataset_dir)
    if not (dataset_dir / "README.md").is_file() or not list((dataset_dir / "data").glob("*.parquet")):
        raise BadInputError(f"{dataset_dir}: incomplete dataset (README.md or data/*.parquet missing)")
    if meta["license"] == "other" and not (meta.get("license_name") and meta.get("license_link")):
        raise BadInputError(
            f"{dataset_dir / METADATA_FILE}: license is 'other' without license_name and license_link",
            hint="set format.license to a Hub license id (e.g. apache-2.0), or format.license_name and "
            "format.license_link, in the recipe and run `tracegen format` again",
        )
    card = dataset_card(meta, repo_id)  # the card names the repo it lives in
    files: dict[str, Path | bytes] = {
        p.relative_to(dataset_dir).as_posix(): p
        for p in dataset_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
    }
    files["README.md"] = card.encode("utf-8")
    # the local tracegen.json keeps its paths (audit and distill read them); the public copy names files only
    files[METADATA_FILE] = (json.dumps(_public_paths(meta), indent=2, sort_keys=True) + "\n").encode("utf-8")
    message = f"tracegen {meta.get('tracegen_version', '')}: {meta['stats']['samples']} samples"
    upload(repo_id, "dataset", files, private=private, message=message, token=token, retry_wait_s=retry_wait_s)
    # only now that the Hub has it: the local card names the repo, and a model card can link the dataset
    write_atomic(dataset_dir / "README.md", lambda f: f.write(card))
    write_json_atomic(dataset_dir / METADATA_FILE, {**meta, "hub_repo_id": repo_id})
    return f"https://huggingface.co/datasets/{repo_id}"
