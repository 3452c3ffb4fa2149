"""Built-in tool specs and the text tool-call protocols.

Servers with function calling send structured ``tool_calls``; the rest write calls as text. These text
forms are understood:

- hermes (Qwen, Hermes): ``<tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call>``, or a
  JSON list of such calls in one block (SmolLM2's and APIGen's function-calling format)
- function_tag (Qwen3.6, OpenHands): ``<function=python><parameter=code>...</parameter></function>``
  (optionally wrapped in ``<tool_call>...</tool_call>``)
- and what a server without a tool parser leaves in the content: DeepSeek-V3 special tokens
  (``deepseek``), Llama 3 JSON (``llama3_json``), Mistral ``[TOOL_CALLS]`` (``mistral_text``) and
  gpt-oss harmony ``to=functions.NAME`` messages (``harmony``).

A call that cannot be parsed is still returned, with its raw text and a ``parse_error``, so the teacher
sees an error observation and can recover, and the dataset keeps what the teacher really wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from tracegen.records import ToolCall, ToolProtocol, ToolSpec

BUILTIN_TOOLS: dict[str, ToolSpec] = {
    "python": ToolSpec(
        name="python",
        description="Run a Python 3 program and return its stdout, stderr and exit code. State does not "
        "persist between calls except files in the working directory. Print what you want to see.",
        parameters={
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The complete program to run."}},
            "required": ["code"],
            "additionalProperties": False,
        },
    ),
    "bash": ToolSpec(
        name="bash",
        description="Run a bash command in the working directory and return its stdout, stderr and exit code.",
        parameters={
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The command line to run."}},
            "required": ["command"],
            "additionalProperties": False,
        },
    ),
}


def tool_specs(names: list[str]) -> list[ToolSpec]:
    return [BUILTIN_TOOLS[name] for name in names]


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str | None]:
    """Arguments JSON -> (object, None), or (None, why it is not a usable arguments object)."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, f"arguments are not valid JSON ({exc.msg} at char {exc.pos})"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def check_arguments(arguments: dict[str, Any], spec: ToolSpec) -> str | None:
    """Why ``arguments`` do not fit the tool's schema (missing, unknown or wrongly typed keys), or None.

    Only what the built-in schemas use is checked: required keys, top-level property types and
    ``additionalProperties: false``. The teacher sees the reason and can fix its call.
    """
    schema = spec.parameters
    properties: dict[str, Any] = schema.get("properties") or {}
    missing = [key for key in schema.get("required") or [] if key not in arguments]
    if missing:
        return f"missing required argument(s) {', '.join(map(repr, missing))} for tool {spec.name!r}"
    if schema.get("additionalProperties") is False:
        unknown = [key for key in arguments if key not in properties]
        if unknown:
            return f"unknown argument(s) {', '.join(map(repr, unknown))} for tool {spec.name!r}"
    for key, value in arguments.items():
        wanted = (properties.get(key) or {}).get("type")
        types = _JSON_TYPES.get(wanted) if isinstance(wanted, str) else None
        if types is not None and (not isinstance(value, types) or (wanted != "boolean" and isinstance(value, bool))):
            return f"argument {key!r} of tool {spec.name!r} must be a JSON {wanted}, got {_json_type(value)}"
    return None


def _json_type(value: Any) -> str:
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types) and not (isinstance(value, bool) and name != "boolean"):
            return name
    return type(value).__name__


class TextCalls(NamedTuple):
    protocol: ToolProtocol | None
    calls: list[ToolCall]


def in_code(text: str, pos: int) -> bool:
    """Whether ``pos`` sits in a Markdown code span or fence: a tag quoted there is prose, not a call."""
    if text.count("```", 0, pos) % 2:
        return True
    return text.count("`", text.rfind("\n", 0, pos) + 1, pos) % 2 == 1


def _tags(text: str, tag: str) -> list[int]:
    """Where ``tag`` starts outside code, followed by what a call needs (JSON or a function tag)."""
    found, pos = [], text.find(tag)
    while pos >= 0:
        rest = text[pos + len(tag) : pos + len(tag) + 64].lstrip()
        if not in_code(text, pos) and (tag != "<tool_call>" or rest.startswith(("{", "[", "<function="))):
            found.append(pos)
        pos = text.find(tag, pos + 1)
    return found


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def _function_tag(content: str, id_prefix: str) -> list[ToolCall] | None:
    starts = _tags(content, "<function=")
    if not starts:
        return None
    calls = []
    for i, start in enumerate(starts):
        match = _FUNCTION.match(content, start)
        assert match is not None
        params = {k: v for k, v in _PARAMETER.findall(match.group(2))}
        error = None if match.group(0).endswith("</function>") else "unterminated <function=...> block"
        calls.append(
            ToolCall(id=f"{id_prefix}-{i}", name=match.group(1), arguments=json.dumps(params), parse_error=error)
        )
    return calls


def _hermes(content: str, id_prefix: str) -> list[ToolCall] | None:
    starts = _tags(content, "<tool_call>")
    if not starts:
        return None
    calls: list[ToolCall] = []
    for start in starts:
        match = _HERMES.match(content, start)
        assert match is not None
        body = match.group(1)
        try:
            items = json.loads(body) if body.startswith("[") else None
        except json.JSONDecodeError:
            items = None  # _json_call below records the raw text and why it does not parse
        if isinstance(items, list):  # SmolLM2 / APIGen: <tool_call>[{...}, {...}]</tool_call>
            calls += [_json_call(json.dumps(item), f"{id_prefix}-{len(calls) + j}") for j, item in enumerate(items)]
        else:
            calls.append(_json_call(body, f"{id_prefix}-{len(calls)}"))
    return calls


# DeepSeek-V3 / V3.1 / R1 special tokens, as vLLM's deepseek_v3 and deepseek_v31 tool parsers read them.
_DS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
_DS_CALL = re.compile(
    "<\uff5ctool\u2581call\u2581begin\uff5c>(.*?)<\uff5ctool\u2581sep\uff5c>(.*?)(?:<\uff5ctool\u2581call\u2581end\uff5c>|$)",
    re.DOTALL,
)
_DS_V3_BODY = re.compile(r"(.*?)\n```(?:json)?\n(.*)\n```\s*$", re.DOTALL)


def _deepseek(content: str, id_prefix: str) -> list[ToolCall] | None:
    if _DS_BEGIN not in content:
        return None
    calls = []
    for i, match in enumerate(_DS_CALL.finditer(content, content.index(_DS_BEGIN))):
        head, body = match.group(1).strip(), match.group(2)
        v3 = _DS_V3_BODY.match(body) if head == "function" else None  # V3: type, sep, name + fenced JSON
        name, raw = (v3.group(1).strip(), v3.group(2)) if v3 else (head, body.strip())
        _, error = parse_arguments(raw)
        if not match.group(0).endswith("\uff5c>") or not name:
            error = "unterminated or malformed DeepSeek tool-call block"
        calls.append(ToolCall(id=f"{id_prefix}-{i}", name=name, arguments=raw, parse_error=error))
    return calls or [ToolCall(id=f"{id_prefix}-0", name="", arguments=content, parse_error=_NO_CALL_IN_BLOCK)]


_NO_CALL_IN_BLOCK = "a tool-call block with no readable call in it"
_PYTHON_TAG = "<|python_tag|>"


def _llama3_json(content: str, id_prefix: str) -> list[ToolCall] | None:
    """Llama 3.x JSON tool calls: the whole reply is ``{"name": ..., "parameters": {...}}`` (several
    joined by ``;``), optionally after ``<|python_tag|>``. A JSON answer without those keys is an answer."""
    text = content.strip()
    tagged = text.startswith(_PYTHON_TAG)
    if tagged:
        text = text[len(_PYTHON_TAG) :].lstrip()
    elif not _LLAMA_CALL.match(text):
        return None
    decoder, pos = json.JSONDecoder(), 0
    calls: list[ToolCall] = []
    while pos < len(text):
        call_id = f"{id_prefix}-{len(calls)}"
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            error = f"tool call is not valid JSON ({exc.msg})"
            calls.append(ToolCall(id=call_id, name="", arguments=text[pos:], parse_error=error))
            break
        if not (tagged or calls or "parameters" in obj or "arguments" in obj):
            return None  # a JSON answer that happens to have a "name" key
        calls.append(_json_call(text[pos:end], call_id))
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    return calls or [ToolCall(id=f"{id_prefix}-0", name="", arguments=content, parse_error=_NO_CALL_IN_BLOCK)]


_LLAMA_CALL = re.compile(r'\{\s*"name"\s*:')


_MISTRAL = "[TOOL_CALLS]"
_MISTRAL_NAME = re.compile(r"\s*([\w.-]+)\s*(?:\[ARGS\])?\s*")


def _mistral_text(content: str, id_prefix: str) -> list[ToolCall] | None:
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}]`` (Mistral tokenizers before v11) or
    ``[TOOL_CALLS]NAME[ARGS]{...}`` (v11 and later), one marker per call."""
    if _MISTRAL not in content:
        return None
    calls: list[ToolCall] = []
    decoder = json.JSONDecoder()
    for segment in content.split(_MISTRAL)[1:]:
        text = segment.strip()
        call_id = f"{id_prefix}-{len(calls)}"
        if text.startswith("["):
            try:
                items, _ = decoder.raw_decode(text)
            except json.JSONDecodeError as exc:
                calls.append(
                    ToolCall(
                        id=call_id, name="", arguments=text, parse_error=f"tool calls are not valid JSON ({exc.msg})"
                    )
                )
                continue
            for item in items if isinstance(items, list) else [items]:
                calls.append(_json_call(json.dumps(item), f"{id_prefix}-{len(calls)}"))
            continue
        match = _MISTRAL_NAME.match(text)
        try:
            if not match:
                raise ValueError("no tool name after [TOOL_CALLS]")
            _, end = decoder.raw_decode(text, match.end())
        except ValueError as exc:
            calls.append(
                ToolCall(
                    id=call_id,
                    name=match.group(1) if match else "",
                    arguments=text,
                    parse_error=f"unreadable [TOOL_CALLS] block ({exc})",
                )
            )
            continue
        raw = text[match.end() : end]
        _, error = parse_arguments(raw)
        calls.append(ToolCall(id=call_id, name=match.group(1), arguments=raw, parse_error=error))
    return calls or [ToolCall(id=f"{id_prefix}-0", name="", arguments=content, parse_error=_NO_CALL_IN_BLOCK)]


# gpt-oss harmony: <|start|>assistant<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>
_HARMONY = re.compile(r"to=functions\.([^\s<]+)(.*?)<\|message\|>(.*?)(?:<\|call\|>|<\|end\|>|$)", re.DOTALL)


def _harmony(content: str, id_prefix: str) -> list[ToolCall] | None:
    if "to=functions." not in content or "<|message|>" not in content:
        return None
    calls = []
    for i, match in enumerate(_HARMONY.finditer(content)):
        raw = match.group(3).strip()
        _, error = parse_arguments(raw)
        if "<|channel|>" not in content[: match.end(2)] and "<|start|>" not in content:
            error = error or "harmony call without a channel"
        calls.append(ToolCall(id=f"{id_prefix}-{i}", name=match.group(1), arguments=raw, parse_error=error))
    return calls or [ToolCall(id=f"{id_prefix}-0", name="", arguments=content, parse_error=_NO_CALL_IN_BLOCK)]


_PARSERS: dict[ToolProtocol, Callable[[str, str], list[ToolCall] | None]] = {
    # Special-token forms first: their markers never occur in prose. function_tag before hermes (it may
    # sit inside <tool_call>); Llama 3 JSON last (only a reply that is nothing but a call object).
    "deepseek": _deepseek,
    "harmony": _harmony,
    "mistral_text": _mistral_text,
    "function_tag": _function_tag,
    "hermes": _hermes,
    "llama3_json": _llama3_json,
}
TEXT_PROTOCOLS = tuple(_PARSERS)


def parse_text_calls(content: str, id_prefix: str, only: ToolProtocol | None = None) -> TextCalls:
    """Find tool calls written as text in ``content``: the first form present (or only the pinned one).

    A tag quoted in a code span, or a ``<tool_call>`` not followed by a call, is prose, not a call.
    """
    if "<" not in content and "[TOOL_CALLS]" not in content and not content.lstrip().startswith("{"):
        return TextCalls(None, [])  # no form's marker: the common answer, decided in one pass
    for protocol in (only,) if only else TEXT_PROTOCOLS:
        parser = _PARSERS.get(protocol)
        calls = parser(content, id_prefix) if parser else None
        if calls is not None:
            return TextCalls(protocol, calls)
    return TextCalls(None, [])


def _json_call(body: str, call_id: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCall(id=call_id, name="", arguments=body, parse_error=f"tool call is not valid JSON ({exc.msg})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(id=call_id, name="", arguments=body, parse_error='tool call needs a "name" string')
    args = obj.get("arguments", obj.get("parameters", {}))
    raw = args if isinstance(args, str) else json.dumps(args)
    _, error = parse_arguments(raw)
    return ToolCall(id=call_id, name=obj["name"], arguments=raw, parse_error=error)


def describe_for_prompt(specs: list[ToolSpec], protocol: ToolProtocol) -> str:
    """Tool instructions for servers without function calling (a pinned text protocol)."""
    lines = ["You can call these tools:"]
    for spec in specs:
        lines.append(json.dumps(spec.openai_schema()["function"]))
    if protocol == "function_tag":
        lines.append(
            "To call a tool, write:\n<function=TOOL_NAME>\n<parameter=PARAM_NAME>\nvalue\n</parameter>\n</function>"
        )
    else:
        lines.append('To call a tool, write:\n<tool_call>\n{"name": "TOOL_NAME", "arguments": {...}}\n</tool_call>')
    lines.append("Tool results come back inside <tool_response></tool_response>.")
    return "\n\n".join(lines)
