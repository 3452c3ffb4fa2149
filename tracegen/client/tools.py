"""Built-in tool specs and the text tool-call protocols.

Servers with function calling send structured ``tool_calls``; the rest write calls as text. Two text
forms are understood:

- hermes (Qwen, Hermes): ``<tool_call>{"name": "python", "arguments": {"code": "..."}}</tool_call>``
- function_tag (Qwen3.6, OpenHands): ``<function=python><parameter=code>...</parameter></function>``
  (optionally wrapped in ``<tool_call>...</tool_call>``)

A call that cannot be parsed is still returned, with its raw text and a ``parse_error``, so the teacher
sees an error observation and can recover, and the dataset keeps what the teacher really wrote.
"""

from __future__ import annotations

import json
import re
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


_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def parse_text_calls(content: str, id_prefix: str, only: ToolProtocol | None = None) -> TextCalls:
    """Find tool calls written as text in ``content`` (function_tag first: it may sit inside <tool_call>)."""
    if only in (None, "function_tag") and "<function=" in content:
        calls = []
        for i, match in enumerate(_FUNCTION.finditer(content)):
            params = {k: v for k, v in _PARAMETER.findall(match.group(2))}
            error = None if match.group(0).endswith("</function>") else "unterminated <function=...> block"
            calls.append(
                ToolCall(id=f"{id_prefix}-{i}", name=match.group(1), arguments=json.dumps(params), parse_error=error)
            )
        return TextCalls("function_tag", calls)
    if only in (None, "hermes") and "<tool_call>" in content:
        calls = []
        for i, match in enumerate(_HERMES.finditer(content)):
            calls.append(_hermes_call(match.group(1), f"{id_prefix}-{i}"))
        return TextCalls("hermes", calls)
    return TextCalls(None, [])


def _hermes_call(body: str, call_id: str) -> ToolCall:
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
