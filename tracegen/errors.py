"""Every error tracegen raises on purpose, in one tree.

::

    TracegenError                 a known failure: one ``Error:`` line, exit 1
    ├── BadInputError             bad usage or bad input (file:line where there is one): exit 2
    │   └── RecipeError           a recipe YAML that does not validate
    ├── TeacherError              the teacher (or simulator, or judge) API failed
    │   ├── RetryableTeacherError 429 / 5xx / dropped or truncated stream / timeout: worth retrying
    │   └── DeadlineError         a request past its total deadline
    ├── RuntimeToolError          a tool runtime could not execute a call (not the tool's own failure)
    └── LocalTeacherError         the local model server (``tracegen.serve``) could not be prepared or started

A ``hint`` says what to do about it. Foreign exceptions (httpx, docker, yaml, pydantic) are translated
once, where they are caught, with ``raise ... from exc``. Messages never contain secrets: the code
that builds them has only the base URL host and model name, never the key.
"""

from __future__ import annotations

from typing import Any


class TracegenError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple[Any, ...]:
        # an error raised in a worker process (format's) reaches the parent with its hint and fields
        return (_restore, (type(self), self.message, dict(self.__dict__)))


def _restore(cls: type[TracegenError], message: str, state: dict[str, Any]) -> TracegenError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class BadInputError(TracegenError):
    exit_code = 2


class RecipeError(BadInputError):
    pass


class TeacherError(TracegenError):
    def __init__(self, message: str, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


class RetryableTeacherError(TeacherError):
    def __init__(
        self,
        message: str,
        hint: str | None = None,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, hint, status)
        self.retry_after_s = retry_after_s


class DeadlineError(TeacherError):
    """A request ran past its total deadline: not retried (a trickling server would trickle again)."""


class RuntimeToolError(TracegenError):
    pass


class LocalTeacherError(TracegenError):
    pass
