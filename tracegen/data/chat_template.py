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
included).
"""

from __future__ import annotations

import functools
from typing import Any

# exact builtin types whose methods are safe to hand out once the sandbox has approved the name
_PLAIN_TYPES = frozenset({str, list, tuple, int, float, bool, type(None)})
_DICT_ATTRIBUTES = frozenset(dir(dict))
_FORMATTERS = frozenset({"format", "format_map"})  # the sandbox wraps these: never memoise them


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> Any:
    """A ``jinja2.Template`` for ``source``, built by transformers' own compiler, with memoised checks.

    Cached per source, as transformers caches its own: compiling costs about 0.1 s.
    """
    from transformers.utils import chat_template_utils

    uncached = getattr(chat_template_utils, "_cached_compile_jinja_template", None)
    if uncached is None:  # a transformers without the uncached builder: use its shared one untouched
        return chat_template_utils._compile_jinja_template(source)
    template = uncached(source)
    _memoise_attribute_checks(template.environment)
    return template


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
