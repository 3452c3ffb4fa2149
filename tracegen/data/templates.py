"""Training templates: a trajectory becomes one text plus character spans that say what each part is.

A template produces :class:`Piece` objects in order; their texts concatenated are the sample's
``text`` and their extents are its ``spans``, so spans cover the text exactly, without gaps or
overlap, by construction. Each piece carries its kind (``template``, ``system``, ``prompt``,
``reasoning``, ``tool_call``, ``observation``, ``answer``, ``critique``), whether it is trained,
for observations their source, and whether it may contain control tokens (only text the template
itself wrote may; everything that came from a task, the teacher or a tool is plain text, so a
hostile ``<|im_end|>`` inside a tool output stays text: :mod:`tracegen.data.tokenize` enforces it).

The fixed-text templates (exact strings: these are the formats published models were trained on)::

    proof     Solve the following problem carefully and show a rigorous derivation.\\n\\nProblem:\\n{question}
              \\n\\nProof:\\n{derivation}\\n\\nFinal Answer:\\n{answer}<EOS>
              (a trajectory with no reasoning and no tool calls has no ``Proof:`` block at all)
    dualmind  ##USER:\\n{prompt}\\n\\n<explore>\\n{derivation}\\n</explore>\\n\\n<examine>\\n{critique}
              \\n</examine>\\n\\n<response>\\n{answer}\\n</response><EOS>
    instruct  ### Instruction:\\n{instruction}\\n\\n### Response:\\n{output}<EOS>

The derivation of an agentic trajectory is its reasoning with every tool call and observation
rendered inline as text blocks, in order (each block ends with a newline; the last newline of the
derivation is dropped)::

    {reasoning of turn 1}\\n
    {text the assistant wrote next to its tool calls, if any}\\n
    <tool_call>\\n{"name": "python", "arguments": {raw arguments JSON}}\\n</tool_call>\\n
    <tool_response>\\n{tool output}\\n</tool_response>\\n
    {reasoning of turn 2}\\n ...

``instruct`` has no reasoning slot: its output is the final answer only.

``chat`` renders the conversation with the student tokenizer's own Jinja chat template (or one
given with ``chat_template``), with every message field replaced by a sentinel so the rendered
text can be cut back into template text and fields. Inside an assistant turn (after the template's
generation header, e.g. ``<|im_start|>assistant\\n``, up to and including its end-of-turn token,
e.g. ``<|im_end|>``) template text is trained, like TRL's ``{% generation %}`` blocks; the newline
the template writes after the end-of-turn token is *not* trained (the model never generates it:
this is the one documented difference from TRL's Qwen3 training template).
A template that reads tool-call arguments as a mapping (Qwen3.6, GLM-4.5, Nemotron 3, Llama 3.1; found
by a probe) is given the parsed JSON object with a sentinel for each key and string value; a field the
template JSON-encodes (Llama 3.1's ``tojson``) is recognised by its sentinel and kept escaped, as written.

Policy (:class:`MaskPolicy`): template text of the prompt, system, prompt and every observation are
masked; reasoning, tool calls, answer, critique, the template text the student must generate
(``\\n\\nFinal Answer:\\n``, ``</explore>`` ..., the chat turn's ``<think>`` tags and end-of-turn) and
the closing EOS are trained. Executed observations can be opted in; simulated ones never.

Not guaranteed: a chat template that rewrites message fields in ways other than stripping newlines
at their edges (which tracegen applies itself: ``reasoning.strip("\\n")``, ``content.lstrip("\\n")``
for assistant turns, as the Qwen templates do) is detected by comparing one real rendering with the
reconstructed text, and refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tracegen.errors import BadInputError
from tracegen.records import AssistantMessage, SystemMessage, ToolMessage, Trajectory, UserMessage

SpanKind = Literal["template", "system", "prompt", "reasoning", "tool_call", "observation", "answer", "critique"]
KINDS: tuple[SpanKind, ...] = (
    "template",
    "system",
    "prompt",
    "reasoning",
    "tool_call",
    "observation",
    "answer",
    "critique",
)
TemplateName = Literal["proof", "dualmind", "chat", "instruct"]

PROOF_HEAD = "Solve the following problem carefully and show a rigorous derivation.\n\nProblem:\n"
PROOF_MID = "\n\nProof:\n"
PROOF_TAIL = "\n\nFinal Answer:\n"
DUALMIND = (
    "##USER:\n",
    "\n\n<explore>\n",
    "\n</explore>\n\n<examine>\n",
    "\n</examine>\n\n<response>\n",
    "\n</response>",
)
INSTRUCT = ("### Instruction:\n", "\n\n### Response:\n")
PROMPT_PARTS: dict[str, tuple[str, str]] = {
    "proof": (PROOF_HEAD, PROOF_MID),
    "dualmind": (DUALMIND[0], DUALMIND[1]),
    "instruct": INSTRUCT,
}


def prompt_part(template: str, question: str) -> str:
    """The text of ``template`` before its first trained token, for ``question`` (what a trained model is given)."""
    head, tail = PROMPT_PARTS[template]
    return head + question + tail


TEMPLATE_TEXTS: dict[str, str] = {
    "proof": PROOF_HEAD + "{question}" + PROOF_MID + "{derivation}" + PROOF_TAIL + "{answer}<EOS>",
    "dualmind": DUALMIND[0]
    + "{prompt}"
    + DUALMIND[1]
    + "{derivation}"
    + DUALMIND[2]
    + "{critique}"
    + DUALMIND[3]
    + "{answer}"
    + DUALMIND[4]
    + "<EOS>",
    "instruct": INSTRUCT[0] + "{instruction}" + INSTRUCT[1] + "{output}<EOS>",
    "chat": "the student tokenizer's chat template (apply_chat_template with tools)",
}


@dataclass(frozen=True, slots=True)
class MaskPolicy:
    """What is trained. Observations: ``none`` or ``executed`` (simulated ones are never trained)."""

    train_observations: Literal["none", "executed"] = "none"

    def observation_trained(self, source: str) -> bool:
        return self.train_observations == "executed" and source == "executed"


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 3.6x as much to create, on the hot path
class Piece:
    text: str
    kind: SpanKind
    train: bool
    source: str | None = None
    """Observation source: executed | simulated | error."""
    control_ok: bool = False
    """Template-written text: control tokens (``<|im_end|>``, ``<think>``) inside it are tokens."""
    derivation: bool = False
    """Inside the derivation region (proof_mask)."""
    eos: bool = False
    """The tokenizer's EOS token, appended by the template."""


@dataclass(slots=True)
class Span:
    start: int
    end: int
    kind: SpanKind
    train: bool
    source: str | None
    weight_class: str


@dataclass(slots=True)
class Rendered:
    """One sample before tokenization."""

    id: str
    template: str
    pieces: list[Piece]
    reasoning_dropped: int = 0
    """Assistant turns whose reasoning the chat template left out."""
    tool_calls_dropped: int = 0
    """Tool calls the chat template left out."""
    messages: list[dict[str, Any]] | None = None
    """``chat``: the OpenAI-shape messages it rendered, kept for the ``messages`` column (built once per sample)."""

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    def spans(self) -> list[Span]:
        """Adjacent pieces with the same attributes merged; covers ``text`` exactly."""
        out: list[Span] = []
        start = pos = 0
        key: tuple[SpanKind, bool, str | None, str] | None = None
        for p in self.pieces:
            if not p.text:
                continue
            piece_key = (p.kind, p.train, p.source, weight_class(p))
            if piece_key != key:
                if key is not None:
                    out.append(Span(start, pos, *key))
                key, start = piece_key, pos
            pos += len(p.text)
        if key is not None:
            out.append(Span(start, pos, *key))
        return out


def weight_class(piece: Piece) -> str:
    """The loss-weighting class distill uses: the kind for trained text, ``masked`` otherwise."""
    if not piece.train:
        return "masked"
    if piece.eos:
        return "eos"
    return piece.kind


# ---------------------------------------------------------------------------------------------------
# Trajectory parts shared by the text templates


@dataclass(frozen=True, slots=True)
class Parts:
    question: str
    derivation: list[Piece]
    answer: str | None


def trajectory_parts(traj: Trajectory, policy: MaskPolicy) -> Parts:
    """The task prompt, the inline derivation (reasoning, tool calls, observations) and the answer."""
    question = next((m.content for m in traj.messages if isinstance(m, UserMessage)), traj.task.prompt)
    assistants = [i for i, m in enumerate(traj.messages) if isinstance(m, AssistantMessage)]
    last = assistants[-1] if assistants else -1
    answer = traj.final_answer
    blocks: list[Piece] = []
    for i, m in enumerate(traj.messages):
        if isinstance(m, AssistantMessage):
            if m.reasoning and m.reasoning.strip():
                blocks.append(Piece(m.reasoning.strip("\n") + "\n", "reasoning", True, derivation=True))
            if i == last and not m.tool_calls:
                if answer is None:
                    answer = m.content
                elif m.content.strip() and m.content.strip() != answer.strip():
                    blocks.append(Piece(m.content.strip("\n") + "\n", "reasoning", True, derivation=True))
                continue
            if m.content.strip():
                blocks.append(Piece(m.content.strip("\n") + "\n", "reasoning", True, derivation=True))
            for call in m.tool_calls:
                text = (
                    f'<tool_call>\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}\n</tool_call>\n'
                )
                blocks.append(Piece(text, "tool_call", True, derivation=True))
        elif isinstance(m, ToolMessage):
            src = m.observation.source
            text = f"<tool_response>\n{m.content}\n</tool_response>\n"
            blocks.append(Piece(text, "observation", policy.observation_trained(src), source=src, derivation=True))
    if blocks:
        lastp = blocks[-1]
        blocks[-1] = Piece(
            lastp.text[:-1], lastp.kind, lastp.train, lastp.source, lastp.control_ok, lastp.derivation, lastp.eos
        )
    return Parts(question=question, derivation=blocks, answer=answer if answer and answer.strip() else None)


def _t(text: str, train: bool = False) -> Piece:
    return Piece(text, "template", train)


def render_proof(traj: Trajectory, policy: MaskPolicy, eos: str) -> Rendered:
    parts = _require_answer(traj, policy)
    pieces = [_t(PROOF_HEAD), Piece(parts.question, "prompt", False)]
    if any(piece.text.strip() for piece in parts.derivation):  # no empty `Proof:` block without one
        pieces += [_t(PROOF_MID), *parts.derivation]
    pieces += [_t(PROOF_TAIL, True), Piece(parts.answer or "", "answer", True), Piece(eos, "template", True, eos=True)]
    return Rendered(traj.id, "proof", pieces)


def render_dualmind(traj: Trajectory, policy: MaskPolicy, eos: str, critique: str) -> Rendered:
    if not critique.strip():
        raise NoCritique(traj.id)  # an empty <examine> block would teach the student to skip the check
    parts = _require_answer(traj, policy)
    pieces = [_t(DUALMIND[0]), Piece(parts.question, "prompt", False), _t(DUALMIND[1])]
    pieces += parts.derivation
    pieces += [
        _t(DUALMIND[2], True),
        Piece(critique, "critique", True),
        _t(DUALMIND[3], True),
        Piece(parts.answer or "", "answer", True),
        _t(DUALMIND[4], True),
        Piece(eos, "template", True, eos=True),
    ]
    return Rendered(traj.id, "dualmind", pieces)


def render_instruct(traj: Trajectory, policy: MaskPolicy, eos: str) -> Rendered:
    parts = _require_answer(traj, policy)
    pieces = [
        _t(INSTRUCT[0]),
        Piece(parts.question, "prompt", False),
        _t(INSTRUCT[1]),
        Piece(parts.answer or "", "answer", True),
        Piece(eos, "template", True, eos=True),
    ]
    return Rendered(traj.id, "instruct", pieces)


class NoAnswer(Exception):
    """The trajectory has no final answer: the text templates skip it (counted)."""


class NoCritique(NoAnswer):
    """dualmind: the sample's critique is empty (counted separately, never trained as an empty block)."""


def _require_answer(traj: Trajectory, policy: MaskPolicy) -> Parts:
    parts = trajectory_parts(traj, policy)
    if parts.answer is None:
        raise NoAnswer(traj.id)
    return parts


# ---------------------------------------------------------------------------------------------------
# chat: the tokenizer's own Jinja template, cut back into fields with sentinels

# A field's stand-in: "\ue000{index}\x01\ue001". The \x01 says how the template wrote it: as is, or JSON-encoded
# (Llama 3.1's ``arguments | tojson``, its tool outputs), which turns it into the six characters "\u0001".
_SENTINEL = re.compile("\ue000(\\d+)(\x01|\\\\u0001)\ue001")


@dataclass(slots=True)
class Field:
    text: str
    kind: SpanKind
    train: bool
    source: str | None = None


RenderFn = Callable[..., str]


@dataclass
class ChatTemplate:
    """A compiled chat template plus the two strings that delimit an assistant turn in its output."""

    render: RenderFn
    """``render(messages=..., tools=..., add_generation_prompt=...) -> str`` (Jinja, as transformers runs it)."""
    header: str
    """What the template writes before an assistant turn (its generation prompt)."""
    end_of_turn: str
    tool_call_open: str = "<tool_call>"
    tool_call_close: str = "</tool_call>"
    verified: bool = False
    mapping_arguments: bool = False
    """The template reads tool-call arguments as a mapping (Qwen3.6, GLM-4.5, Nemotron 3, Llama 3.1): they are
    rendered from the parsed JSON object (what transformers documents), not the JSON string OpenAI sends."""


def chat_messages(traj: Trajectory) -> list[dict[str, Any]]:
    """The trajectory as OpenAI-shape chat messages (arguments stay the raw JSON string)."""
    out: list[dict[str, Any]] = []
    for m in traj.messages:
        if isinstance(m, SystemMessage | UserMessage):
            out.append({"role": m.role, "content": m.content})
        elif isinstance(m, AssistantMessage):
            msg: dict[str, Any] = {"role": "assistant", "content": m.content.lstrip("\n")}
            if m.reasoning is not None:
                msg["reasoning_content"] = m.reasoning.strip("\n")
            if m.tool_calls:
                msg["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in m.tool_calls
                ]
            out.append(msg)
        else:
            out.append({"role": "tool", "tool_call_id": m.tool_call_id, "name": m.name, "content": m.content})
    return out


def with_mapping_arguments(messages: list[dict[str, Any]], where: str = "") -> list[dict[str, Any]]:
    """``messages`` with every tool call's ``arguments`` parsed into the mapping a template such as Qwen3.6's reads.

    The ``messages`` column keeps them as JSON strings; a consumer does the same with one line per call:
    ``call["function"]["arguments"] = json.loads(call["function"]["arguments"])``.
    """
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                raw = c["function"]["arguments"]
                try:
                    parsed = json.loads(raw) if isinstance(raw, str) else raw
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    raise BadInputError(
                        f"{where}tool call {c['id']}: its arguments are not a JSON object ({str(raw)[:60]!r}), and the "
                        "chat template reads them as a mapping: drop the record (tracegen filter's structural "
                        "check) or use --template proof"
                    )
                calls.append({**c, "function": {**c["function"], "arguments": parsed}})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


DROPPABLE = ("reasoning", "tool_calls")
"""Trajectory content a chat template may leave out of the text, only with ``allow_dropped``."""


def allow_dropped_fix(missing: Sequence[str]) -> str:
    return (
        "use a template that renders them (--chat-template FILE), --template proof, or train without them "
        f"explicitly with --allow-dropped {','.join(missing)}"
    )


def render_chat(
    traj: Trajectory, policy: MaskPolicy, chat: ChatTemplate, allow_dropped: frozenset[str] = frozenset()
) -> Rendered:
    """The conversation rendered by ``chat``; content the template leaves out is an error unless allowed."""
    messages = chat_messages(traj)
    rendered_messages = (
        with_mapping_arguments(messages, f"trajectory {traj.id}: ") if chat.mapping_arguments else messages
    )
    fields: list[Field] = []
    sources = [m.observation.source if isinstance(m, ToolMessage) else None for m in traj.messages]
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)

    def sub(text: str, kind: SpanKind, train: bool, source: str | None = None) -> str:
        if not text:
            return text
        if "\ue000" in text or "\ue001" in text:
            raise BadInputError(f"trajectory {traj.id}: text contains the private-use characters U+E000/U+E001")
        fields.append(Field(text, kind, train, source))
        return f"\ue000{len(fields) - 1}\x01\ue001"

    def sub_json(value: Any) -> Any:
        """A parsed arguments object with each string (keys too) replaced by its sentinel; numbers stay."""
        if isinstance(value, str):
            return sub(value, "tool_call", True)
        if isinstance(value, dict):
            return {sub_json(k): sub_json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub_json(v) for v in value]
        return value

    reasoning_turns = 0
    masked: list[dict[str, Any]] = []
    for i, m in enumerate(rendered_messages):
        m2 = dict(m)
        role = m["role"]
        if role == "system":
            m2["content"] = sub(m["content"], "system", False)
        elif role == "user":
            m2["content"] = sub(m["content"], "prompt", False)
        elif role == "tool":
            src = sources[i] or "error"
            m2["content"] = sub(m["content"], "observation", policy.observation_trained(src), src)
        else:
            m2["content"] = sub(m["content"], "answer" if i == last_assistant else "reasoning", True)
            if "reasoning_content" in m:
                if m["reasoning_content"]:
                    reasoning_turns += 1
                m2["reasoning_content"] = sub(m["reasoning_content"], "reasoning", True)
            if "tool_calls" in m:
                m2["tool_calls"] = [
                    {**c, "function": {**c["function"], "arguments": sub_json(c["function"]["arguments"])}}
                    for c in m["tool_calls"]
                ]
        masked.append(m2)
    tools = [t.openai_schema() for t in traj.tools] or None
    try:
        rendered = chat.render(messages=masked, tools=tools, add_generation_prompt=False)
    except Exception as exc:  # the template is user code: any failure is a bad template or record
        raise BadInputError(f"trajectory {traj.id}: the chat template failed: {exc}") from exc
    pieces: list[Piece] = []
    seen: set[int] = set()
    state = _ChatState()
    cursor = 0
    for match in _SENTINEL.finditer(rendered):
        state.template_text(rendered[cursor : match.start()], chat, pieces)
        idx = int(match.group(1))
        f = fields[idx]
        seen.add(idx)
        if state.in_assistant and f.kind in ("prompt", "observation"):
            # the assistant turn never ended: the next turn's template text (headers, tags) would be trained
            raise BadInputError(
                f"trajectory {traj.id}: the chat template never writes end_of_turn {chat.end_of_turn!r} between an "
                f"assistant turn and the {'user' if f.kind == 'prompt' else 'tool'} message after it; set "
                "format.end_of_turn in the recipe to the text that ends an assistant turn in this template "
                "(e.g. GLM-4.5: <|observation|> before a tool result)"
            )
        in_reasoning = f.kind == "reasoning" and state.in_assistant
        text = f.text if match.group(2) == "\x01" else json.dumps(f.text, ensure_ascii=False)[1:-1]
        pieces.append(Piece(text, f.kind, f.train, f.source, derivation=in_reasoning))
        cursor = match.end()
    state.template_text(rendered[cursor:], chat, pieces)
    dropped = sum(1 for i, f in enumerate(fields) if i not in seen and f.kind == "reasoning")
    calls_dropped = sum(1 for i, f in enumerate(fields) if i not in seen and f.kind == "tool_call")
    out = Rendered(traj.id, "chat", pieces, min(dropped, reasoning_turns), calls_dropped, messages)
    lost = {"reasoning": out.reasoning_dropped, "tool_calls": calls_dropped}
    refused = [k for k in DROPPABLE if lost[k] and k not in allow_dropped]
    if refused:
        what = " and ".join(f"{lost[k]} {k.replace('_', ' ')} block(s)" for k in refused)
        raise BadInputError(f"trajectory {traj.id}: the chat template leaves out {what}; {allow_dropped_fix(refused)}")
    if not chat.verified:
        _verify_chat(out, rendered_messages, tools, chat)
    return out


@dataclass
class _ChatState:
    in_assistant: bool = False
    in_call: bool = False

    def template_text(self, text: str, chat: ChatTemplate, out: list[Piece]) -> None:
        """Cut template text at assistant-turn and tool-call boundaries and append it as pieces."""
        while text:
            if not self.in_assistant:
                i = text.find(chat.header)
                if i < 0:
                    out.append(Piece(text, "template", False, control_ok=True))
                    return
                out.append(Piece(text[: i + len(chat.header)], "template", False, control_ok=True))
                text = text[i + len(chat.header) :]
                self.in_assistant = True
                continue
            # inside an assistant turn: trained, up to and including the end-of-turn token
            j = text.find(chat.end_of_turn)
            head = text if j < 0 else text[: j + len(chat.end_of_turn)]
            self._assistant_text(head, chat, out)
            if j < 0:
                return
            text = text[j + len(chat.end_of_turn) :]
            self.in_assistant = False
            self.in_call = False

    def _assistant_text(self, text: str, chat: ChatTemplate, out: list[Piece]) -> None:
        while text:
            marker = chat.tool_call_close if self.in_call else chat.tool_call_open
            k = text.find(marker)
            if k < 0:
                out.append(Piece(text, "tool_call" if self.in_call else "template", True, control_ok=True))
                return
            if self.in_call:
                cut = k + len(marker)
                out.append(Piece(text[:cut], "tool_call", True, control_ok=True))
            else:
                cut = k
                if cut:
                    out.append(Piece(text[:cut], "template", True, control_ok=True))
            text = text[cut:]
            self.in_call = not self.in_call


def _verify_chat(out: Rendered, messages: list[dict[str, Any]], tools: Any, chat: ChatTemplate) -> None:
    """Once per template: the real rendering must equal the text rebuilt from sentinels."""
    hostile = ("\ue000", "<|", "<think>", "</think>", "<tool_call>", "</tool_call>")
    if any(h in json.dumps(messages, ensure_ascii=False) for h in hostile):
        return  # a field that looks like template syntax: the template may parse it; verify on another
    real = chat.render(messages=messages, tools=tools, add_generation_prompt=False)
    if real != out.text:
        at = next(
            (i for i, (a, b) in enumerate(zip(real, out.text, strict=False)) if a != b), min(len(real), len(out.text))
        )
        raise BadInputError(
            f"the chat template rewrites message fields in a way tracegen cannot track (first difference at "
            f"character {at}: {real[at : at + 40]!r} vs {out.text[at : at + 40]!r})",
            hint="pass a template that inserts message fields verbatim with --chat-template",
        )
    chat.verified = True


PROBE_REASONING = "tracegen probe reasoning"
PROBE_ARGUMENTS = '{"tracegen_probe": 1}'


def _probe_messages(arguments: Any) -> list[dict[str, Any]]:
    call = {"id": "call_0", "type": "function", "function": {"name": "probe", "arguments": arguments}}
    return [
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": "", "reasoning_content": PROBE_REASONING, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "name": "probe", "content": "output"},
        {"role": "assistant", "content": "answer", "reasoning_content": PROBE_REASONING},
    ]


_PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "a probe", "parameters": {}}}


def _renders(chat: ChatTemplate, messages: list[dict[str, Any]], tools: Any) -> str | None:
    try:
        return chat.render(messages=messages, tools=tools, add_generation_prompt=False)
    except Exception:  # noqa: BLE001  # the template is user code: raising is its way to refuse the input
        return None


def missing_capabilities(chat: ChatTemplate) -> list[str]:
    """What the template cannot render at all: ``reasoning`` and/or ``tool_calls``, probed on one conversation.

    The probe's assistant turns follow the only user message, where every template that renders
    reasoning renders it (Qwen3's drops it only before the last user message).
    """
    messages = _probe_messages(json.loads(PROBE_ARGUMENTS) if chat.mapping_arguments else PROBE_ARGUMENTS)
    text = _renders(chat, messages, [_PROBE_TOOL])
    if text is None:  # it raises on a tool turn: probe reasoning alone
        text = _renders(chat, [messages[0], messages[3]], None) or ""
    return [k for k, probe in zip(DROPPABLE, (PROBE_REASONING, "tracegen_probe"), strict=True) if probe not in text]


def needs_mapping_arguments(chat: ChatTemplate) -> bool:
    """The template iterates tool-call arguments as a mapping (Qwen3.6, GLM-4.5, Nemotron 3, Llama 3.1) and
    fails on the JSON string that OpenAI sends and tracegen renders, or re-encodes it (Llama 3.1's ``tojson``)."""
    as_string = _renders(chat, _probe_messages(PROBE_ARGUMENTS), [_PROBE_TOOL]) or ""
    as_mapping = _renders(chat, _probe_messages(json.loads(PROBE_ARGUMENTS)), [_PROBE_TOOL]) or ""
    return PROBE_ARGUMENTS not in as_string and "tracegen_probe" in as_mapping


def compile_chat_template(source: str, special: dict[str, str], end_of_turn: str) -> ChatTemplate:
    """Compile a Jinja chat template exactly as transformers' ``apply_chat_template`` runs it."""
    from tracegen.data.chat_template import compile_template

    compiled = compile_template(source)

    def render(**kwargs: Any) -> str:
        return str(compiled.render(**special, **kwargs))

    probe = [{"role": "user", "content": "\ue0000\ue001"}]
    try:
        with_prompt = render(messages=probe, tools=None, add_generation_prompt=True)
        without = render(messages=probe, tools=None, add_generation_prompt=False)
    except Exception as exc:  # the template is user code
        raise BadInputError(f"the chat template failed on a one-message conversation: {exc}") from exc
    if not with_prompt.startswith(without) or len(with_prompt) == len(without):
        raise BadInputError("the chat template writes no generation prompt (add_generation_prompt=True)")
    header = with_prompt[len(without) :]
    if "<think>" in header and not header.startswith("<think>"):
        header = header[: header.index("<think>")]
    chat = ChatTemplate(render=render, header=header, end_of_turn=end_of_turn)
    chat.mapping_arguments = needs_mapping_arguments(chat)
    return chat


def renderer_for(
    template: TemplateName,
    policy: MaskPolicy,
    eos: str,
    chat: ChatTemplate | None = None,
    critiques: Sequence[str | None] | None = None,
    allow_dropped: frozenset[str] = frozenset(),
) -> Callable[[int, Trajectory], Rendered]:
    """``render(i, trajectory)`` for the chosen template; raises :class:`NoAnswer` to skip a sample."""
    if template == "proof":
        return lambda i, t: render_proof(t, policy, eos)
    if template == "instruct":
        return lambda i, t: render_instruct(t, policy, eos)
    if template == "dualmind":
        assert critiques is not None
        crit = critiques
        return lambda i, t: render_dualmind(t, policy, eos, crit[i] or "")
    assert chat is not None
    tmpl = chat
    return lambda i, t: render_chat(t, policy, tmpl, allow_dropped)
