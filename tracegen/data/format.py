"""``tracegen format``: trajectories (or an imported CoT dataset) to a tokenized, Hub-ready dataset folder.

Reads top to bottom: load and validate the input (a bad line stops the run before any work, naming
file:line) → the tokenizer → critiques for ``dualmind`` (``--examine``) → per batch of samples, on
``workers`` forked processes: render to text + spans (:mod:`tracegen.data.templates`), tokenize
(:mod:`tracegen.data.tokenize`), rows as an Arrow table → metadata, card → one atomic write of the folder
(:mod:`tracegen.data.hub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracegen import __version__
from tracegen.config import FormatConfig
from tracegen.data.hub import public_name, rows_table, save_dataset
from tracegen.data.templates import (
    DROPPABLE,
    TEMPLATE_TEXTS,
    ChatTemplate,
    MaskPolicy,
    NoAnswer,
    NoCritique,
    Rendered,
    allow_dropped_fix,
    chat_messages,
    compile_chat_template,
    missing_capabilities,
    renderer_for,
    trajectory_parts,
)
from tracegen.data.tokenize import Stats, Tok, TokenBatch, Tokenized, assemble, encode, lay_out, load_tokenizer
from tracegen.errors import BadInputError, TracegenError
from tracegen.fingerprint import deciding
from tracegen.progress_bar import stage_bar
from tracegen.records import AssistantMessage, SystemMessage, ToolMessage, Trajectory, UserMessage
from tracegen.store import disk_errors, read_trajectories, writer_lock


@dataclass
class FormatResult:
    out: Path
    stats: Stats
    metadata: dict[str, Any]


def load_input(path: Path, config: FormatConfig) -> list[Trajectory]:
    if config.import_format == "cot":
        from tracegen.data.importers import import_cot

        return import_cot(path, config.import_columns)  # a missing path is named there (or is a Hub id)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    if path.is_dir():
        for name in ("kept.jsonl", "trajectories.jsonl"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise BadInputError(f"{path}: no kept.jsonl or trajectories.jsonl in this folder")
    trajs = list(read_trajectories(path))
    if not trajs:
        raise BadInputError(f"{path}: no trajectories")
    return trajs


def derivation_text(traj: Trajectory) -> str:
    return "".join(p.text for p in trajectory_parts(traj, MaskPolicy()).derivation)


CRITIQUE_PROMPT = (
    "Problem:\n{question}\n\nProposed solution:\n{derivation}\n\nFinal answer: {answer}\n\n"
    "Verify this solution step by step. Point out every error, gap or unjustified step, check the tool "
    "outputs it relies on, and say whether the final answer is correct. Reply with the critique only."
)


EXAMINE_RETRIES = 2
"""Times an empty critique is asked for again before its sample is skipped."""


async def _examine_teacher(trajs: list[Trajectory], config: FormatConfig) -> list[str | None]:
    from tracegen.client.chat import ChatClient

    client = ChatClient(config.teacher, role="teacher")
    gate = asyncio.Semaphore(config.examine_concurrency)

    async def one(t: Trajectory) -> str | None:
        if t.critique and t.critique.strip():
            return t.critique
        parts = trajectory_parts(t, MaskPolicy())
        prompt = CRITIQUE_PROMPT.format(
            question=parts.question, derivation=derivation_text(t), answer=parts.answer or "(none)"
        )
        # an empty reply (a thinking teacher stopped by its token cap, say) is asked again, a bounded number of times
        for _ in range(1 + EXAMINE_RETRIES):
            async with gate:
                reply = await client.complete([{"role": "user", "content": prompt}])
            if reply.content.strip():
                return reply.content.strip()
        return None  # the sample is skipped and counted: an empty <examine> block is never trained

    try:
        return list(await asyncio.gather(*(one(t) for t in trajs)))
    finally:
        await client.aclose()


def critiques_for(trajs: list[Trajectory], config: FormatConfig) -> list[str | None]:
    """dualmind's examine block: existing critiques, the teacher's (asked now) or the judge's rationale."""
    if config.examine == "teacher":
        found = asyncio.run(_examine_teacher(trajs, config))
        for i, c in enumerate(found):
            trajs[i] = trajs[i].model_copy(update={"critique": c})
        return found
    if config.examine == "judge":
        out: list[str | None] = []
        for t in trajs:
            reasons = [v.reason for v in t.verdicts if v.judge_model and v.reason.strip()]
            out.append(t.critique or (reasons[0] if reasons else None))
        missing = sum(1 for c in out if c is None)
        if missing:
            raise BadInputError(
                f"--examine judge: {missing} of {len(trajs)} records have no judge rationale",
                hint="run `tracegen filter --verifier judge` first, or use --examine teacher",
            )
        return out
    existing = [t.critique for t in trajs]
    missing = sum(1 for c in existing if not (c and c.strip()))
    if missing:
        raise BadInputError(
            f"--template dualmind needs a self-critique per sample and {missing} of {len(trajs)} records have none",
            hint="pass --examine teacher (the teacher critiques each derivation) or --examine judge (the filter "
            "judge's rationale)",
        )
    return existing


MESSAGE_FIELDS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name", "observation_source")


def message_rows(traj: Trajectory, messages: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The ``messages`` column: exactly the messages ``--template chat`` renders (OpenAI tool-call shape,
    reasoning in ``reasoning_content``), plus each tool message's ``observation_source``; absent fields are None,
    which transformers' ``apply_chat_template`` drops before rendering. ``messages``: the ones ``chat`` already
    built for this trajectory, if any."""
    rows = []
    for m, msg in zip(traj.messages, messages or chat_messages(traj), strict=True):
        row = dict.fromkeys(MESSAGE_FIELDS)
        row.update(msg)
        if isinstance(m, ToolMessage):
            row["observation_source"] = m.observation.source
        rows.append(row)
    return rows


def _think(reasoning: str | None) -> str:
    """Reasoning as the ``<think>`` block LLaMA-Factory's reasoning templates read (their ``thought_words``)."""
    text = (reasoning or "").strip("\n")
    return f"<think>\n{text}\n</think>\n\n" if text.strip() else ""


def sharegpt_row(traj: Trajectory) -> dict[str, Any]:
    """LLaMA-Factory sharegpt: human / function_call / observation / gpt, ``tools`` as JSON.

    Every assistant turn keeps its reasoning (a leading ``<think>`` block) and its text. A tool-call
    turn is ``{think}{text}\n<tool_call>\n{calls}\n</tool_call>``, the shape LLaMA-Factory's
    ``FunctionFormatter`` splits with its ``tool_call_words``: the text around the block is kept
    verbatim, the block's JSON (one call, or a list for parallel calls) becomes the template's calls.
    Parallel calls' outputs are one ``observation`` turn (joined by newlines).
    """
    system = next((m.content for m in traj.messages if isinstance(m, SystemMessage)), "")
    conv: list[dict[str, str]] = []
    pending_obs: list[str] = []
    for m in traj.messages:
        if isinstance(m, ToolMessage):
            pending_obs.append(m.content)
            continue
        if pending_obs:
            conv.append({"from": "observation", "value": "\n".join(pending_obs)})
            pending_obs = []
        if isinstance(m, UserMessage):
            conv.append({"from": "human", "value": m.content})
        elif isinstance(m, AssistantMessage):
            content = m.content.lstrip("\n")
            if m.tool_calls:
                calls = []
                for c in m.tool_calls:
                    try:
                        args: Any = json.loads(c.arguments)
                    except ValueError:
                        args = c.arguments
                    calls.append({"name": c.name, "arguments": args})
                block = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
                text = content + "\n" if content else ""
                value = f"{_think(m.reasoning)}{text}<tool_call>\n{block}\n</tool_call>"
                conv.append({"from": "function_call", "value": value})
            else:
                conv.append({"from": "gpt", "value": _think(m.reasoning) + content})
    if pending_obs:
        conv.append({"from": "observation", "value": "\n".join(pending_obs)})
    tools = json.dumps([t.openai_schema()["function"] for t in traj.tools], ensure_ascii=False)
    return {"id": traj.id, "conversations": conv, "system": system, "tools": tools}


LLAMA_FACTORY_ENTRY = {
    "file_name": "sharegpt",
    "formatting": "sharegpt",
    "columns": {"messages": "conversations", "system": "system", "tools": "tools"},
    "tags": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "observation_tag": "observation",
        "function_tag": "function_call",
    },
}
"""The ``dataset_info.json`` entry LLaMA-Factory needs for ``sharegpt/`` (``dataset_dir`` = the dataset folder)."""


def _sharegpt_table(trajs: list[Trajectory]) -> Any:
    import pyarrow as pa

    rows = [sharegpt_row(t) for t in trajs]
    conv_type = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    return pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "conversations": pa.array([r["conversations"] for r in rows], conv_type),
            "system": pa.array([r["system"] for r in rows], pa.string()),
            "tools": pa.array([r["tools"] for r in rows], pa.string()),
        }
    )


def build_row(traj: Trajectory, tok_row: Tokenized, messages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    ids = tok_row["input_ids"]
    return {
        "id": traj.id,
        "template": tok_row["template"],
        "text": tok_row["text"],
        "spans": tok_row["spans"],  # Span objects: rows_table lays them out column by column
        "input_ids": ids,
        "labels": tok_row["labels"],
        "proof_mask": tok_row["proof_mask"],
        "messages": message_rows(traj, messages),
        "tools": json.dumps([t.openai_schema() for t in traj.tools], ensure_ascii=False),
        "task_id": traj.task.id,
        "sample_index": traj.sample_index,
        "teacher_model": traj.teacher.model,
        "runtime": traj.runtime.kind,
        "stop_reason": traj.stop_reason,
        "critique": traj.critique,
        "num_tokens": len(ids),
        "num_trained": int((tok_row["labels"] != -100).sum()),
        "truncated": bool(tok_row["truncated"]),
    }


def provenance(trajs: list[Trajectory], input_path: Path, config: FormatConfig) -> dict[str, Any]:
    teachers: Counter[tuple[str, str | None]] = Counter()
    for t in trajs:
        s = t.teacher.sampling
        # what was sent (None: not sent); an importer's record holds no sampling settings at all
        sent = None if t.recipe_fingerprint == "imported" else json.dumps(s.model_dump(exclude_none=True))
        teachers[(t.teacher.model, sent)] += 1
    obs: Counter[str] = Counter()
    simulators: set[str] = set()
    for t in trajs:
        for m in t.messages:
            if isinstance(m, ToolMessage):
                obs[m.observation.source] += 1
                if m.observation.simulator:
                    simulators.add(m.observation.simulator)
        if t.runtime.simulator_model:
            simulators.add(t.runtime.simulator_model)
    checks: dict[str, list[int]] = {}
    for t in trajs:
        for v in t.verdicts:
            c = checks.setdefault(v.check, [0, 0])
            c[0] += int(v.passed)
            c[1] += 1
    prov: dict[str, Any] = {
        "samples_in": len(trajs),
        "teachers": [
            {"model": m, "sampling": s and json.loads(s), "samples": n} for (m, s), n in teachers.most_common()
        ],
        "observations": dict(obs),
        "simulators": sorted(simulators),
        "stop_reasons": dict(Counter(t.stop_reason for t in trajs)),
        "imported_from": (config.import_columns.source or input_path.name) if config.import_format == "cot" else None,
        "critiques": {"teacher": f"asked {config.teacher.model}", "judge": "filter judge rationale"}.get(
            config.examine, "from the records" if config.template == "dualmind" else None
        ),
        "filter": None,
    }
    report = (input_path if input_path.is_dir() else input_path.parent) / "report.json"
    if report.is_file():
        try:
            data = json.loads(report.read_text(encoding="utf-8"))
        except ValueError:
            data = None
        if isinstance(data, dict):
            summary = {k: v for k, v in data.items() if isinstance(v, int | float | str)}
            prov["filter"] = {
                "summary": ", ".join(f"{k}={v}" for k, v in sorted(summary.items())) or "report.json present",
                "checks": {k: f"{p} / {n}" for k, (p, n) in checks.items()},
                "report": data,
            }
    elif checks:
        prov["filter"] = {
            "summary": "verdicts present, no report.json",
            "checks": {k: f"{p} / {n}" for k, (p, n) in checks.items()},
        }
    return prov


def content_counts(trajs: list[Trajectory]) -> dict[str, int]:
    """How many samples have reasoning, and how many have tool calls (what a template must be able to render)."""
    counts = dict.fromkeys(DROPPABLE, 0)
    for t in trajs:
        turns = [m for m in t.messages if isinstance(m, AssistantMessage)]
        counts["reasoning"] += any(m.reasoning and m.reasoning.strip() for m in turns)
        counts["tool_calls"] += any(m.tool_calls for m in turns)
    return counts


def refuse_missing_capabilities(chat: ChatTemplate, trajs: list[Trajectory], config: FormatConfig) -> None:
    """Before any work: a chat template that cannot render content the samples have is refused, unless allowed."""
    have = content_counts(trajs)
    which = config.chat_template or f"the tokenizer {config.tokenizer}'s own"
    missing = [k for k in missing_capabilities(chat) if have[k] and k not in config.allow_dropped]
    if missing:
        names = " or ".join(k.replace("_", " ") for k in missing)
        raise BadInputError(
            f"the chat template ({which}) cannot render {names}, which "
            + ", ".join(f"{have[k]} of {len(trajs)} samples have {k.replace('_', ' ')}" for k in missing)
            + f": {allow_dropped_fix(missing)}"
        )


def chat_template_for(config: FormatConfig, tok: Tok) -> ChatTemplate:
    """The compiled chat template for ``--template chat``: ``--chat-template FILE`` or the tokenizer's own."""
    if config.chat_template:
        try:
            source = Path(config.chat_template).read_text(encoding="utf-8")
        except OSError as exc:
            raise BadInputError(f"--chat-template {config.chat_template}: {exc.strerror}") from exc
    elif tok.chat_template:
        source = tok.chat_template
    else:
        raise BadInputError(f"tokenizer {tok.source} has no chat template", hint="pass --chat-template FILE")
    return compile_chat_template(source, tok.special_map, config.end_of_turn or tok.eos)


@dataclass
class _Job:
    """What every worker needs. Set before the workers fork, so they inherit it instead of unpickling it."""

    trajs: list[Trajectory]
    render: Callable[[int, Trajectory], Rendered]
    tok: Tok
    max_length: int | None
    overflow: str
    batch_size: int
    progress: Callable[[int], None] | None
    """Samples done, reported per batch (in-process only; workers report whole ranges)."""


_JOB: _Job | None = None


@dataclass
class Chunk:
    """A range of samples, formatted: the Arrow table of its kept rows and what happened to the rest."""

    table: Any | None
    kept: list[int]
    stats: Stats


def _format_range(bounds: tuple[int, int]) -> Chunk:
    """Render, tokenize and build the rows of ``trajs[lo:hi]`` (in a worker, or in-process).

    Batch by batch, pipelined: the tokenizer encodes one batch on a helper thread (it releases the
    GIL) while this thread renders the next and assembles the one before, so Python and the
    tokenizer each keep a core busy.
    """
    job = _JOB
    assert job is not None
    lo, hi = bounds
    stats = Stats()
    rows: list[dict[str, Any]] = []
    kept: list[int] = []

    def finish(indices: list[int], batch: TokenBatch, encoded: Future[None]) -> None:
        encoded.result()
        tok_rows = assemble(batch, job.tok, job.max_length, stats, job.overflow)
        for i, sample, tok_row in zip(indices, batch.samples, tok_rows, strict=True):
            if tok_row is not None:
                rows.append(build_row(job.trajs[i], tok_row, sample.messages))
                kept.append(i)

    with ThreadPoolExecutor(1, thread_name_prefix="tracegen-encode") as encoder:
        pending: tuple[list[int], TokenBatch, Future[None]] | None = None
        for start in range(lo, hi, job.batch_size):
            indices: list[int] = []
            rendered: list[Rendered] = []
            for i in range(start, min(start + job.batch_size, hi)):
                try:
                    rendered.append(job.render(i, job.trajs[i]))
                    indices.append(i)
                except NoCritique:
                    stats.dropped_no_critique += 1
                except NoAnswer:
                    stats.dropped_no_answer += 1
            batch = lay_out(rendered, job.tok)
            encoded = encoder.submit(encode, batch)
            if pending is not None:
                finish(*pending)
            pending = (indices, batch, encoded)
            if job.progress is not None:
                job.progress(min(start + job.batch_size, hi) - start)
        if pending is not None:
            finish(*pending)
    return Chunk(rows_table(rows) if rows else None, kept, stats)


def _quiet_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool


def resolve_workers(workers: int) -> int:
    """``0`` means one per two CPU cores this process may use; without ``fork`` (Windows) there is one process.

    Each worker keeps two cores busy: Python renders on one while the tokenizer encodes on the
    other. On 2 cores one process measured 2.20-2.47x TRL against 2.03-2.32x for two (bench/format.py).
    """
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    if workers:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)


def format_rows(
    trajs: list[Trajectory], config: FormatConfig, tok: Tok, critiques: list[str | None] | None, show_progress: bool
) -> tuple[Any | None, list[int], Stats]:
    """Every sample rendered, tokenized and turned into rows, in batches of ``batch_size``, on ``workers`` processes.

    Returns the Arrow table of the kept rows (in input order), their indices into ``trajs``, and the stats.
    Workers are forked from this process after the tokenizer and template are ready, and the result is
    the same for any number of them.
    """
    global _JOB
    import pyarrow as pa  # here, once: not in every forked worker

    policy = MaskPolicy(train_observations="executed" if config.train_observations == "executed" else "none")
    chat = chat_template_for(config, tok) if config.template == "chat" else None
    if chat is not None:
        refuse_missing_capabilities(chat, trajs, config)
    render = renderer_for(config.template, policy, tok.eos, chat, critiques, frozenset(config.allow_dropped))
    workers = resolve_workers(config.workers)
    n = len(trajs)
    if workers == 1:
        bounds = [(0, n)] if n else []  # one pipelined range; progress reported per batch
    else:  # ranges of at most 8 batches, at least 4 per worker, so the last ones finish close together
        size = max(1, min(8 * config.batch_size, -(-n // (4 * workers))))
        bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    workers = min(workers, len(bounds))
    tables: list[Any] = []
    kept: list[int] = []
    stats = Stats()
    # The loaded records live until the end: frozen, the collector does not re-scan them on every full
    # collection (about a quarter of the time otherwise) and forked workers do not touch their pages.
    # The loop itself makes almost no reference cycles (59 objects for 2,000 conversations, measured),
    # so the collector's passes over its fresh containers are pure cost (about 13% more): paused here
    # and in the forked workers, which inherit the setting.
    collecting = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        with contextlib.ExitStack() as stack:
            progress = stack.enter_context(_progress(n, show_progress))
            _JOB = _Job(
                trajs,
                render,
                tok,
                config.max_length,
                config.overflow,
                config.batch_size,
                progress if workers == 1 else None,
            )
            chunks: Iterator[Chunk]
            if workers > 1:
                if chat is not None:  # check the template once here, not once per worker
                    _first_render(render, trajs)
                pool = stack.enter_context(_worker_pool(workers))
                chunks = pool.map(_format_range, bounds)
            else:
                chunks = map(_format_range, bounds)
            for (lo, hi), chunk in zip(bounds, chunks, strict=True):
                if chunk.table is not None:
                    tables.append(chunk.table)
                kept += chunk.kept
                stats.add(chunk.stats)
                if workers > 1:
                    progress(hi - lo)
    finally:
        _JOB = None
        gc.unfreeze()
        if collecting:
            gc.enable()
    return (pa.concat_tables(tables) if tables else None), kept, stats


def _first_render(render: Callable[[int, Trajectory], Rendered], trajs: list[Trajectory]) -> None:
    for i, t in enumerate(trajs):
        try:
            render(i, t)
            return
        except NoAnswer:
            continue


@contextlib.contextmanager
def _worker_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """Forked workers; one that dies (out of memory, killed) fails the run instead of hanging it."""
    # each worker is one core's worth of work: the tokenizer's own thread pool would only oversubscribe
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_quiet_worker)
        pool.submit(int).result()  # start the workers now, while the variable is set
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        yield pool
    except BrokenProcessPool as exc:
        raise TracegenError(
            "a format worker process died (out of memory, or killed); nothing was written",
            hint="run again with fewer --workers (each holds a batch of rows in memory)",
        ) from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    bar, task = stage_bar("format", total, enabled, stats=False)
    with bar:
        yield lambda n: bar.advance(task, n)


def format_dataset(input_path: Path, out: Path, config: FormatConfig, show_progress: bool = False) -> FormatResult:
    if not config.tokenizer:
        raise BadInputError("no tokenizer given", hint="pass --tokenizer qwen3|smollm2|PATH")
    trajs = load_input(input_path, config)
    tok = load_tokenizer(config.tokenizer)
    # One writer per dataset folder; the lock sits beside it, since the folder itself is replaced.
    with writer_lock(out.with_name(f".{out.name}.lock"), str(out)), disk_errors(out.parent):
        return _format_loaded(trajs, tok, input_path, out, config, show_progress)


def _format_loaded(
    trajs: list[Trajectory], tok: Tok, input_path: Path, out: Path, config: FormatConfig, show_progress: bool
) -> FormatResult:
    import pyarrow.compute as pc

    critiques = critiques_for(trajs, config) if config.template == "dualmind" else None
    table, kept_idx, stats = format_rows(trajs, config, tok, critiques, show_progress)
    kept = [trajs[i] for i in kept_idx]
    if table is None:
        raise TracegenError(
            f"no sample left to write ({len(trajs)} read: {stats.dropped_no_answer} without a final answer, "
            f"{stats.dropped_too_long} too long, {stats.dropped_no_trained} with nothing to train, "
            f"{stats.dropped_no_critique} with an empty critique)"
        )
    metadata: dict[str, Any] = {
        "tracegen_version": __version__,
        "template": config.template,
        "template_text": TEMPLATE_TEXTS[config.template]
        if config.template != "chat"
        else f"{TEMPLATE_TEXTS['chat']}: {public_name(config.chat_template or tok.name)}",
        "license": config.license,
        "license_name": config.license_name,
        "license_link": config.license_link,
        "tokenizer": {
            "name": tok.name,
            "source": tok.source,
            "path": str(tok.path),
            "vocab_hash": tok.vocab_hash,
            "vocab_size": int(tok.full.get_vocab_size(with_added_tokens=True)),
            "eos_token": tok.eos,
        },
        "policy": {
            "train_observations": config.train_observations,
            "max_length": config.max_length,
            "overflow": config.overflow,
            "allow_dropped": permitted_drops(config),
        },
        "longest_sample": int(pc.max(table.column("num_tokens")).as_py()),
        "template_cannot_render": missing_capabilities(chat_template_for(config, tok))
        if config.template == "chat"
        else [],
        "stats": stats.as_dict(),
        "provenance": provenance(trajs, input_path, config),
        "exports": list(config.export),
        "config": deciding(config),
    }
    extra = {"sharegpt": _sharegpt_table(kept)} if "sharegpt" in config.export else None
    files = {"dataset_info.json": {"tracegen": LLAMA_FACTORY_ENTRY}} if extra else None
    save_dataset(out, table, metadata, config.shard_rows, extra, files)
    return FormatResult(out=out, stats=stats, metadata=metadata)


def permitted_drops(config: FormatConfig) -> list[str]:
    """Content the text may lack: what ``allow_dropped`` names; ``instruct`` has no slot for either, by design."""
    return list(DROPPABLE) if config.template == "instruct" else sorted(config.allow_dropped)


def format_config(recipe: Path | None, overrides: dict[str, Any]) -> FormatConfig:
    """Defaults < the recipe's ``format:`` section < flags; unknown keys and bad values are errors."""
    from tracegen.recipe import apply_overrides, load_recipe

    return apply_overrides(load_recipe(recipe).format if recipe else FormatConfig(), overrides)


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """``question=q,reasoning=cot,answer=a`` -> a mapping (``--import-columns``)."""
    if not spec:
        return None
    out = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise BadInputError(f"--import-columns {spec!r}: expected FIELD=COLUMN[,FIELD=COLUMN...]")
        out[key.strip()] = value.strip()
    return out


def summary_lines(result: FormatResult) -> list[str]:
    s = result.stats
    frac = s.trained / max(1, s.tokens)
    return [
        f"{s.samples} samples, {s.tokens:,} tokens, {s.trained:,} trained ({frac:.1%}), {s.straddled} straddled",
        f"dropped: {s.dropped_no_answer} without answer, {s.dropped_too_long} too long, "
        f"{s.dropped_no_trained} nothing to train, {s.dropped_no_critique} with an empty critique; "
        f"{s.truncated} truncated "
        f"(overflow: {result.metadata['policy']['overflow']})",
        f"wrote {result.out}",
    ]
