from __future__ import annotations

import json

from tracegen.client.tools import parse_arguments, parse_text_calls


def test_hermes_calls_parse_with_arguments_as_raw_json() -> None:
    text = 'Let me run it.\n<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>'
    found = parse_text_calls(text, "c")
    assert found.protocol == "hermes"
    [call] = found.calls
    assert call.name == "python" and json.loads(call.arguments) == {"code": "print(1)"}
    assert call.parse_error is None


def test_several_hermes_calls_and_a_malformed_one() -> None:
    text = (
        '<tool_call>{"name": "bash", "arguments": {"command": "ls"}}</tool_call><tool_call>{name: python}</tool_call>'
    )
    calls = parse_text_calls(text, "c").calls
    assert [c.name for c in calls] == ["bash", ""]
    assert calls[1].parse_error and "not valid JSON" in calls[1].parse_error
    assert calls[1].arguments == "{name: python}"  # the raw text is kept


def test_hermes_list_form_is_one_call_per_item() -> None:
    """SmolLM2's documented function-calling answer: a JSON list of calls inside one <tool_call> block."""
    text = (
        '<tool_call>[\n{"name": "python", "arguments": {"code": "print(1)"}},\n'
        '{"name": "bash", "arguments": {"command": "ls"}}\n]</tool_call>\n<tool_call>[{"name": "python"]</tool_call>'
    )
    found = parse_text_calls(text, "c", only="hermes")
    assert [(c.id, c.name, c.parse_error) for c in found.calls[:2]] == [("c-0", "python", None), ("c-1", "bash", None)]
    assert json.loads(found.calls[1].arguments) == {"command": "ls"}
    assert found.calls[2].id == "c-2" and found.calls[2].parse_error and "not valid JSON" in found.calls[2].parse_error
    assert parse_text_calls(text, "c").protocol == "hermes"  # found unpinned too


def test_function_tag_calls_parse_even_inside_tool_call() -> None:
    text = (
        "<tool_call>\n<function=python>\n<parameter=code>\nfor i in range(3):\n    print(i)\n"
        "</parameter>\n</function>\n</tool_call>"
    )
    found = parse_text_calls(text, "c")
    assert found.protocol == "function_tag"
    assert json.loads(found.calls[0].arguments) == {"code": "for i in range(3):\n    print(i)"}


def test_unterminated_function_tag_is_a_parse_error() -> None:
    calls = parse_text_calls("<function=bash><parameter=command>ls</parameter>", "c").calls
    assert calls[0].parse_error == "unterminated <function=...> block"


def test_pinned_protocol_ignores_the_other_form() -> None:
    text = '<tool_call>{"name": "bash", "arguments": {}}</tool_call>'
    assert parse_text_calls(text, "c", only="function_tag").calls == []


def test_parse_arguments() -> None:
    assert parse_arguments('{"a": 1}') == ({"a": 1}, None)
    assert parse_arguments("") == ({}, None)
    assert parse_arguments("[1]")[1] == "arguments must be a JSON object, got list"
    assert "not valid JSON" in (parse_arguments('{"a": ')[1] or "")
