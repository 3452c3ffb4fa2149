"""``tracegen audit``: which tokens are trained and why, and the masking invariants, checked independently.

The audit does not trust the formatter's bookkeeping: it re-derives every token's character extent
from ``input_ids`` alone (the bytes each vocabulary entry decodes to, summed with numpy) and checks,
over the whole dataset:

1. spans cover ``text`` exactly (sorted, contiguous, no gap or overlap);
2. ``input_ids``, ``labels`` and ``proof_mask`` have equal lengths, and labels equal input_ids wherever trained;
3. every sample has trained tokens;
4. ``decode(input_ids) == text``;
5. no token inside a prompt, system or observation span is trained (unless the dataset's policy opted
   executed observations in), no simulated observation is ever trained, and no trained token covers
   a character of a masked span;
6. every reasoning block and tool call of the trajectory (the ``messages`` column) is in ``text``,
   unless the dataset's policy permits dropping it (``--allow-dropped``; ``instruct`` by design).

Violations name the sample (row and id) and the token position; ``tracegen audit`` exits 1 on any.
Not checked: that the masking policy suits your training (that is the card's and your call).
"""

from __future__ import annotations

import html as html_lib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracegen.data.hub import load_metadata, read_rows
from tracegen.data.templates import KINDS, SpanKind
from tracegen.data.token_bytes import ByteTable, byte_table, token_char_extents
from tracegen.data.tokenize import IGNORE, KIND_INDEX, Tok, load_tokenizer
from tracegen.errors import BadInputError

FORBIDDEN = ("system", "prompt", "observation")
MAX_REPORTED = 50
STATES = (
    ("trained", "trained"),
    ("template", "masked: template"),
    ("system", "masked: system"),
    ("prompt", "masked: prompt"),
    ("obs-executed", "masked: observation (executed)"),
    ("obs-simulated", "masked: observation (simulated)"),
    ("obs-error", "masked: observation (error)"),
    ("masked", "masked: other"),
    ("straddle", "masked: straddles a boundary"),
)
STATE_INDEX = {s: i for i, (s, _) in enumerate(STATES)}
RICH_STYLES = {
    "trained": ("black on green3", "black on green4"),
    "template": ("grey50 on grey15", "grey50 on grey23"),
    "system": ("white on grey30", "white on grey35"),
    "prompt": ("white on blue3", "white on dodger_blue3"),
    "obs-executed": ("black on gold3", "black on yellow3"),
    "obs-simulated": ("white on red3", "white on dark_red"),
    "obs-error": ("white on orange_red1", "white on dark_orange3"),
    "masked": ("white on grey42", "white on grey46"),
    "straddle": ("white on magenta3", "white on dark_magenta"),
}
HTML_COLORS = {
    "trained": "#3fb950",
    "template": "#6e7681",
    "system": "#8b949e",
    "prompt": "#388bfd",
    "obs-executed": "#d29922",
    "obs-simulated": "#f85149",
    "obs-error": "#db6d28",
    "masked": "#a5a5a5",
    "straddle": "#bc4ec8",
}


@dataclass
class AuditReport:
    samples: int = 0
    tokens: int = 0
    trained: int = 0
    zero_trained: int = 0
    straddled: int = 0
    truncated: int = 0
    kind_tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    kind_trained: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    missing: dict[str, int] = field(default_factory=lambda: {"reasoning": 0, "tool_calls": 0})
    """Trajectory content (from ``messages``) absent from ``text``: reasoning blocks, tool calls."""

    def violate(self, message: str) -> None:
        self.violation_count += 1
        if len(self.violations) < MAX_REPORTED:
            self.violations.append(message)


# ---------------------------------------------------------------------------------------------------
# checks


@dataclass
class SampleView:
    row: int
    id: str
    tokens: list[tuple[str, int, int, SpanKind, str, str]]
    """(display text, id, label, kind, state, weight class) per token."""
    counts: dict[str, int]


def _span_arrays(spans: list[dict[str, Any]], n: int, allow_executed: bool) -> tuple[Any, Any, Any, Any]:
    masked = np.zeros(n, np.int64)
    forbidden = np.zeros(n, np.int64)
    kind = np.zeros(n, np.int64)
    state = np.full(n, STATE_INDEX["masked"], np.int64)
    for sp in spans:
        a, b = sp["start"], sp["end"]
        kind[a:b] = KIND_INDEX.get(sp["kind"], 0)
        if not sp["train"]:
            masked[a:b] = 1
            src = sp.get("source")
            if sp["kind"] == "observation":
                state[a:b] = STATE_INDEX.get(f"obs-{src}", STATE_INDEX["masked"])
            elif sp["kind"] in ("template", "system", "prompt"):
                state[a:b] = STATE_INDEX[sp["kind"]]
        else:
            state[a:b] = STATE_INDEX["trained"]
        if sp["kind"] in FORBIDDEN and not (
            sp["kind"] == "observation" and allow_executed and sp.get("source") == "executed"
        ):
            forbidden[a:b] = 1
    return masked, forbidden, kind, state


def check_sample(
    i: int, row: dict[str, Any], table: ByteTable, tok: Tok, decoded: str, report: AuditReport, allow_executed: bool
) -> tuple[Any, Any, Any, Any, Any] | None:
    sid = row["id"]
    where = f"sample {i} ({sid})"
    text: str = row["text"]
    spans: list[dict[str, Any]] = row["spans"]
    ids = np.asarray(row["input_ids"], dtype=np.int64)
    labels = np.asarray(row["labels"], dtype=np.int64)
    proof = np.asarray(row["proof_mask"], dtype=np.int64)
    # 1. spans cover the text
    pos = 0
    for k, sp in enumerate(spans):
        if sp["start"] != pos or sp["end"] <= sp["start"]:
            report.violate(f"{where}: span {k} [{sp['start']}, {sp['end']}) leaves a gap or overlap at character {pos}")
            break
        if sp["kind"] == "observation" and sp.get("source") == "simulated" and sp["train"]:
            report.violate(f"{where}: span {k} is a simulated observation marked trained")
        if sp["kind"] in FORBIDDEN and sp["train"] and not (allow_executed and sp.get("source") == "executed"):
            report.violate(f"{where}: span {k} ({sp['kind']}) is marked trained")
        pos = sp["end"]
    else:
        if pos != len(text):
            report.violate(f"{where}: spans end at character {pos}, the text at {len(text)}")
    # 2. lengths and labels
    if not (len(ids) == len(labels) == len(proof)):
        report.violate(f"{where}: input_ids/labels/proof_mask lengths {len(ids)}/{len(labels)}/{len(proof)} differ")
        return None
    trained = labels != IGNORE
    bad = np.flatnonzero(trained & (labels != ids))
    if len(bad):
        report.violate(f"{where} position {int(bad[0])}: label {int(labels[bad[0]])} != input_id {int(ids[bad[0]])}")
    # 3. trained tokens exist
    if not trained.any():
        report.zero_trained += 1
        report.violate(f"{where}: no trained token")
    # 4. decode round-trip
    if decoded != text:
        at = next(
            (k for k, (a, b) in enumerate(zip(decoded, text, strict=False)) if a != b), min(len(decoded), len(text))
        )
        report.violate(f"{where}: decode(input_ids) differs from text at character {at}")
        return None
    ext = token_char_extents(text, ids, table.lengths)
    if ext is None:
        report.violate(f"{where}: token bytes do not add up to the text")
        return None
    cs, ce = ext
    # 5. no forbidden or masked character under a trained token
    masked, forbidden, kind, state = _span_arrays(spans, len(text), allow_executed)
    cm = np.concatenate(([0], np.cumsum(masked)))
    cf = np.concatenate(([0], np.cumsum(forbidden)))
    n_masked = cm[ce] - cm[cs]
    n_forbidden = cf[ce] - cf[cs]
    for label, hits in (
        ("inside a prompt/system/observation span", np.flatnonzero(trained & (n_forbidden > 0))),
        ("covering a masked span", np.flatnonzero(trained & (n_masked > 0))),
    ):
        if len(hits):
            p = int(hits[0])
            report.violate(
                f"{where} position {p}: token {int(ids[p])} {text[cs[p] : ce[p]]!r} is trained {label} "
                f"({len(hits)} such tokens)"
            )
    width = ce - cs
    straddle = (n_masked > 0) & (n_masked < width)
    safe_start = np.minimum(cs, max(len(text) - 1, 0))
    tok_kind = kind[safe_start] if len(text) else np.zeros(len(ids), np.int64)
    tok_state = np.where(trained, STATE_INDEX["trained"], state[safe_start] if len(text) else 0)
    tok_state = np.where(straddle & ~trained, STATE_INDEX["straddle"], tok_state)
    report.samples += 1
    report.tokens += len(ids)
    report.trained += int(trained.sum())
    report.straddled += int(straddle.sum())
    report.truncated += int(bool(row.get("truncated")))
    kc = np.bincount(tok_kind, minlength=len(KINDS))
    kt = np.bincount(tok_kind[trained], minlength=len(KINDS))
    for k, name in enumerate(KINDS):
        report.kind_tokens[name] += int(kc[k])
        report.kind_trained[name] += int(kt[k])
    return cs, ce, tok_kind, tok_state, labels


def check_content(i: int, row: dict[str, Any], permitted: list[str], report: AuditReport) -> None:
    """6. every reasoning block and tool call of the trajectory (``messages``) is in ``text``, unless permitted.

    A truncated row is exempt (it says so); datasets of older versions name the fields differently.
    """
    if row.get("truncated") or not row.get("messages"):
        return
    text: str = row["text"]
    lost = {"reasoning": 0, "tool_calls": 0}
    for m in row["messages"]:
        if m.get("role") != "assistant":
            continue
        reasoning = (m.get("reasoning_content") or m.get("reasoning") or "").strip()
        lost["reasoning"] += bool(reasoning) and reasoning not in text
        for call in m.get("tool_calls") or []:
            arguments = (call.get("function") or call).get("arguments") or ""
            lost["tool_calls"] += not _call_in_text(arguments, text)
    for kind, n in lost.items():
        report.missing[kind] += n
        if n and kind not in permitted:
            report.violate(
                f"sample {i} ({row['id']}): {n} {kind.replace('_', ' ')} block(s) of the trajectory are not in the "
                "text (the chat template left them out) and the dataset was not formatted with "
                f"--allow-dropped {kind}"
            )


def _call_in_text(arguments: str, text: str) -> bool:
    """A call's arguments are in the text verbatim (templates that write the JSON string: Qwen3, DeepSeek-V3) or,
    for templates that write them from the parsed object (Qwen3.6, GLM-4.5, Nemotron 3, Llama 3.1), each key and
    string value is, as is or JSON-escaped (Llama 3.1's ``tojson``)."""
    if arguments.strip() in text:
        return True
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return False
    return isinstance(parsed, dict) and all(
        s in text or json.dumps(s, ensure_ascii=False)[1:-1] in text for s in _json_strings(parsed)
    )


def _json_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v)


def _view(i: int, row: dict[str, Any], checked: tuple[Any, Any, Any, Any, Any], limit: int | None) -> SampleView:
    cs, ce, tok_kind, tok_state, labels = checked
    text: str = row["text"]
    weights = np.empty(len(text), dtype=object)
    for sp in row["spans"]:
        weights[sp["start"] : sp["end"]] = sp.get("weight_class") or ""
    tokens = []
    shown = 0
    n = len(cs) if limit is None else min(len(cs), limit)
    for p in range(n):  # display only: one sample, bounded
        end = int(ce[p])
        piece = text[shown:end] if end > shown else ""
        shown = max(shown, end)
        start = int(cs[p])
        tokens.append(
            (
                piece,
                int(row["input_ids"][p]),
                int(labels[p]),
                KINDS[int(tok_kind[p])],
                STATES[int(tok_state[p])][0],
                str(weights[start]) if start < len(text) else "",
            )
        )
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t[4]] = counts.get(t[4], 0) + 1
    return SampleView(row=i, id=row["id"], tokens=tokens, counts=counts)


def resolve_audit_tokenizer(meta: dict[str, Any], override: str | None) -> Tok:
    info = meta.get("tokenizer") or {}
    candidates = [override] if override else [info.get("source"), info.get("path")]
    last_error: Exception | None = None
    for spec in candidates:
        if not spec:
            continue
        try:
            tok = load_tokenizer(spec)
        except BadInputError as exc:
            last_error = exc
            continue
        if info.get("vocab_hash") and tok.vocab_hash != info["vocab_hash"]:
            raise BadInputError(
                f"tokenizer {spec} has vocabulary hash {tok.vocab_hash}, "
                f"the dataset was made with {info['vocab_hash']}",
                hint="pass the tokenizer the dataset was formatted with: --tokenizer PATH",
            )
        return tok
    raise BadInputError(
        f"cannot load the dataset's tokenizer ({info.get('name')}){': ' + str(last_error) if last_error else ''}",
        hint="pass --tokenizer PATH",
    )


def run_audit(
    dataset_dir: Path,
    index: int = 0,
    html: Path | None = None,
    tokenizer: str | None = None,
    max_tokens: int = 2000,
    html_samples: int = 200,
    console: Any = None,
) -> AuditReport:
    meta = load_metadata(dataset_dir)
    columns = ["id", "text", "spans", "input_ids", "labels", "proof_mask", "truncated", "messages"]
    table = read_rows(dataset_dir, columns)
    rows = table.to_pylist()
    if not 0 <= index < len(rows):
        raise BadInputError(f"--index {index}: the dataset has {len(rows)} samples (0..{len(rows) - 1})")
    tok = resolve_audit_tokenizer(meta, tokenizer)
    btable = byte_table(tok)
    allow_executed = (meta.get("policy") or {}).get("train_observations") == "executed"
    decoded = tok.full.decode_batch([r["input_ids"] for r in rows], skip_special_tokens=False)
    report = AuditReport()
    views: list[SampleView] = []
    shown: SampleView | None = None
    permitted = (meta.get("policy") or {}).get("allow_dropped") or []
    for i, row in enumerate(rows):
        check_content(i, row, permitted, report)
        checked = check_sample(i, row, btable, tok, decoded[i], report, allow_executed)
        if checked is None:
            continue
        if i == index:
            shown = _view(i, row, checked, max_tokens)
        if html is not None and i < html_samples:
            views.append(_view(i, row, checked, None))
    print_report(report, shown, meta, console)
    if html is not None:
        write_html(html, views, report, meta)
    return report


# ---------------------------------------------------------------------------------------------------
# terminal


def print_report(report: AuditReport, view: SampleView | None, meta: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    con = console or Console(highlight=False)
    legend = Text("legend: ")
    for state, label in STATES:
        legend.append(f" {label} ", style=RICH_STYLES[state][0])
        legend.append(" ")
    con.print(legend)
    con.print("token boundaries: adjacent tokens alternate shades; ↵ marks a newline", style="dim")
    if view is not None:
        con.rule(f"sample {view.row}: {view.id}")
        body = Text()
        for k, (piece, _tid, _label, _kind, state, _w) in enumerate(view.tokens):
            shown = piece.replace("\n", "↵\n") if piece else "·"
            body.append(shown, style=RICH_STYLES[state][k % 2])
        con.print(body)
        counts = Table(title=f"sample {view.row} tokens by state")
        counts.add_column("state")
        counts.add_column("tokens", justify="right")
        for state, label in STATES:
            if view.counts.get(state):
                counts.add_row(label, str(view.counts[state]))
        con.print(counts)
    stats = Table(title=f"dataset: {report.samples} samples, tokenizer {meta.get('tokenizer', {}).get('name')}")
    stats.add_column("kind")
    stats.add_column("tokens", justify="right")
    stats.add_column("trained", justify="right")
    for kind_name in KINDS:
        if report.kind_tokens[kind_name]:
            stats.add_row(kind_name, f"{report.kind_tokens[kind_name]:,}", f"{report.kind_trained[kind_name]:,}")
    con.print(stats)
    fmt = meta.get("stats") or {}
    con.print(
        f"trained fraction {report.trained / max(1, report.tokens):.1%} "
        f"({report.trained:,} of {report.tokens:,} tokens); "
        f"samples with zero trained tokens: {report.zero_trained}; straddled tokens: {report.straddled}; "
        f"truncated: {report.truncated}; dropped at format time: {fmt.get('dropped_too_long', 0)} too long, "
        f"{fmt.get('dropped_no_answer', 0)} without answer, {fmt.get('dropped_no_trained', 0)} nothing to train"
    )
    if any(report.missing.values()):
        permitted = (meta.get("policy") or {}).get("allow_dropped") or []
        con.print(
            "[bold yellow]left out of the text[/] (in the trajectories, not trained): "
            + ", ".join(f"{n:,} {k.replace('_', ' ')} block(s)" for k, n in report.missing.items() if n)
            + f"; permitted: {', '.join(permitted) or 'nothing'}"
        )
    if report.violation_count:
        con.print(f"[bold red]INVARIANTS BROKEN: {report.violation_count} violation(s)[/]")
        for v in report.violations:
            con.print(f"  [red]✗[/] {v}", highlight=False)
    else:
        con.print(
            f"[bold green]invariants hold[/] over {report.samples} samples: spans cover the text, decode round-trips, "
            "labels equal input_ids where trained, no prompt/system/observation token trained, every sample trains"
        )


# ---------------------------------------------------------------------------------------------------
# HTML

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tracegen audit: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; background: #0d1117; color: #e6edf3; }}
#legend span.sw {{ display: inline-block; padding: 2px 8px; margin: 2px; border-radius: 4px; color: #000; }}
#tokens {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; background: #161b22;
  padding: 1em; border-radius: 6px; }}
.tok {{ border-right: 1px solid rgba(0,0,0,.55); border-radius: 2px; padding: 1px 0; cursor: default; color: #000; }}
.tok.alt {{ filter: brightness(0.82); }}
.tok:hover {{ outline: 2px solid #fff; }}
#hover {{ position: sticky; top: 0; background: #21262d; padding: .5em; border-radius: 6px; min-height: 1.5em;
  font-family: ui-monospace, monospace; }}
table {{ border-collapse: collapse; margin: .5em 0; }} td, th {{ border: 1px solid #30363d; padding: 2px 8px; }}
td.n {{ text-align: right; }}
</style></head><body>
<h1>tracegen audit</h1>
<p id="summary">{summary}</p>
<div id="violations">{violations}</div>
<h2>Dataset tokens by kind</h2>
<table id="kinds"><tr><th>kind</th><th>tokens</th><th>trained</th></tr>{kind_rows}</table>
<h2>Legend</h2><div id="legend"></div>
<h2>Sample <select id="picker"></select></h2>
<table id="counts"></table>
<div id="hover">hover a token: id, label, kind, weight</div>
<div id="tokens"></div>
<script id="data" type="application/json">{data}</script>
<script>
const D = JSON.parse(document.getElementById('data').textContent);
const legend = document.getElementById('legend');
for (const [state, label] of D.states) {{
  const s = document.createElement('span'); s.className = 'sw'; s.style.background = D.colors[state];
  s.dataset.state = state; s.textContent = label; legend.appendChild(s);
}}
const picker = document.getElementById('picker');
D.samples.forEach((s, i) => {{
  const o = document.createElement('option'); o.value = i; o.textContent = s.row + ': ' + s.id; picker.appendChild(o);
}});
const hover = document.getElementById('hover');
function show(i) {{
  const s = D.samples[i];
  const box = document.getElementById('tokens'); box.textContent = '';
  const counts = {{}};
  const frag = document.createDocumentFragment();
  s.tokens.forEach((t, k) => {{
    const [text, id, label, kind, state, weight] = t;
    counts[state] = (counts[state] || 0) + 1;
    const el = document.createElement('span');
    el.className = 'tok' + (k % 2 ? ' alt' : '');
    el.style.background = D.colors[state];
    el.textContent = text === '' ? '\\u00b7' : text.replace(/\\n/g, '\\u21b5\\n');
    const info = 'position ' + k + ' | id ' + id + ' | label ' + label + ' | kind ' + kind + ' | ' + state +
      ' | weight ' + (weight || '-');
    el.title = info;
    el.addEventListener('mouseenter', () => {{ hover.textContent = info; }});
    frag.appendChild(el);
  }});
  box.appendChild(frag);
  const table = document.getElementById('counts');
  table.innerHTML = '<tr><th>state</th><th>tokens</th></tr>';
  for (const [state, label] of D.states) {{
    if (!counts[state]) continue;
    const tr = document.createElement('tr');
    tr.innerHTML = '<td></td><td class="n"></td>';
    tr.children[0].textContent = label; tr.children[1].textContent = counts[state];
    tr.dataset.state = state; table.appendChild(tr);
  }}
  document.body.dataset.rendered = String(s.tokens.length);
}}
picker.addEventListener('change', () => show(Number(picker.value)));
if (D.samples.length) show(0);
</script></body></html>
"""


def write_html(path: Path, views: list[SampleView], report: AuditReport, meta: dict[str, Any]) -> None:
    """One self-contained page: no network, the data inline as JSON."""
    data = {
        "states": [list(s) for s in STATES],
        "colors": HTML_COLORS,
        "samples": [{"row": v.row, "id": v.id, "tokens": v.tokens} for v in views],
    }
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    summary = (
        f"{report.samples} samples, {report.tokens:,} tokens, {report.trained:,} trained "
        f"({report.trained / max(1, report.tokens):.1%}); zero-trained samples {report.zero_trained}; straddled "
        f"{report.straddled}; truncated {report.truncated}. Tokenizer {meta.get('tokenizer', {}).get('name')}, "
        f"template {meta.get('template')}."
    )
    if report.violation_count:
        violations = (
            f"<p style='color:#f85149'><b>{report.violation_count} invariant violation(s)</b></p><ul>"
            + "".join(f"<li>{html_lib.escape(v)}</li>" for v in report.violations)
            + "</ul>"
        )
    else:
        violations = "<p style='color:#3fb950'><b>invariants hold</b></p>"
    kind_rows = "".join(
        f"<tr><td>{k}</td><td class='n'>{report.kind_tokens[k]:,}</td>"
        f"<td class='n'>{report.kind_trained[k]:,}</td></tr>"
        for k in KINDS
        if report.kind_tokens[k]
    )
    page = _PAGE.format(
        title=html_lib.escape(str(meta.get("template"))),
        summary=html_lib.escape(summary),
        violations=violations,
        kind_rows=kind_rows,
        data=payload,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
