"""Chat templates compiled exactly as transformers compiles them, with the sandbox's checks memoised.

``apply_chat_template`` runs a template in Jinja's ``ImmutableSandboxedEnvironment``: every attribute
access (``message.role``, ``content.startswith``) goes through ``environment.getattr``, which for a
dict first raises and catches an ``AttributeError`` and for a string re-derives from scratch whether
the attribute is safe. That verdict depends only on the object's type and the attribute name
(:meth:`is_safe_attribute` looks at nothing else), so tracegen asks the sandbox once per (type,
name) and reuses the answer; the value itself is read afresh every time. Callables other than the
methods of plain builtin types, ``str.format`` and names of dict methods always take the sandbox's
own path, so what a template may reach is unchanged: only the repeated work goes.

The environment is a fresh one (transformers caches its own per template source, and patching that
one would also speed up every ``apply_chat_template`` call of the process, a benchmark's baseline
included). It comes from transformers' private ``_cached_compile_jinja_template``, so the memo is used
only with the transformers release it was written and tested against (:data:`WRITTEN_FOR`, checked
once at import); with any other, templates render through the public ``render_jinja_template``:
the same output, without the memo's speed-up.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Any

WRITTEN_FOR = "5.24"
"""The transformers release (major.minor) whose private template compiler the memo was written against."""


def memo_supported(installed: str | None) -> bool:
    """Whether the memo may patch this transformers version's compiled environment."""
    return installed is not None and ".".join(installed.split(".")[:2]) == WRITTEN_FOR


def _installed_transformers() -> str | None:
    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


MEMO = memo_supported(_installed_transformers())
"""Decided at import: False on any other transformers, and then every template takes the public path."""

# exact builtin types whose methods are safe to hand out once the sandbox has approved the name
_PLAIN_TYPES = frozenset({str, list, tuple, int, float, bool, type(None)})
_DICT_ATTRIBUTES = frozenset(dir(dict))
_FORMATTERS = frozenset({"format", "format_map"})  # the sandbox wraps these: never memoise them


@functools.lru_cache(maxsize=16)
def compile_template(source: str, memo: bool | None = None) -> Any:
    """Something with ``render(**kwargs) -> str`` for ``source``: a ``jinja2.Template`` from transformers'
    own compiler with memoised checks when ``memo`` (default :data:`MEMO`), else a :class:`PublicTemplate`.

    Cached per source, as transformers caches its own: compiling costs about 0.1 s.
    """
    if not (MEMO if memo is None else memo):
        return PublicTemplate(source)
    from transformers.utils import chat_template_utils

    template = chat_template_utils._cached_compile_jinja_template(source)
    _memoise_attribute_checks(template.environment)
    return template


class PublicTemplate:
    """``source`` rendered by transformers' public ``render_jinja_template`` (what ``apply_chat_template`` calls)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def render(
        self, messages: list[Any] | None = None, tools: Any = None, add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        # annotated ``-> str``, it returns (one text per conversation, generation indices)
        result: Any = render_jinja_template(
            [messages or []],
            tools=tools,
            chat_template=self.source,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        return str(result[0][0])


def _memoise_attribute_checks(env: Any) -> None:
    sandbox_getattr = env.getattr
    undefined = env.undefined
    safe: set[tuple[type, str]] = set()

    def getattr_(obj: Any, attribute: str) -> Any:
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            # what the sandbox does for a dict key, without raising AttributeError first
            try:
                return obj[attribute]
            except LookupError:
                return undefined(obj=obj, name=attribute)
        if (kind, attribute) in safe:
            try:
                value = getattr(obj, attribute)
            except AttributeError:  # e.g. a namespace attribute not set on this instance
                return sandbox_getattr(obj, attribute)
            # values (loop.index0, ns.flag) and the plain types' methods; other callables re-checked
            if kind in _PLAIN_TYPES or not callable(value):
                return value
            return sandbox_getattr(obj, attribute)
        value = sandbox_getattr(obj, attribute)
        if (
            attribute not in _FORMATTERS
            and hasattr(obj, attribute)  # on the instance: str has no `mro` although type str does
            and env.is_safe_attribute(obj, attribute, value)
        ):
            safe.add((kind, attribute))
        return value

    env.getattr = getattr_
