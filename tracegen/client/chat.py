"""The OpenAI-compatible chat client shared by the teacher, the tool simulator and (later) the judge.

Streaming (the default) reads Server-Sent Events straight off a keep-alive connection
(:mod:`tracegen.client.http`) and parses each ``data:`` line with :func:`tracegen.client.wire.loads`: at
hundreds of concurrent trajectories the per-chunk and per-request costs are the client's whole CPU budget,
and the SDK's per-chunk pydantic objects (or httpx's pool bookkeeping) cost several times this loop.
Non-streaming chat requests (``stream: false``) go through the ``openai`` SDK; the Responses and Messages
APIs then fetch the whole reply object over the same pool. Every path ends in :func:`assemble`, so a reply
means the same thing however it arrived.

What a reply may look like, all handled:

- reasoning in ``reasoning_content`` (DeepSeek, vLLM, SGLang), in ``reasoning``, or inline as
  ``<think>...</think>`` in the content (also with only ``</think>``, when the template put the
  opening tag in the prompt);
- native tool calls as deltas split across chunks, several per turn, or calls written as text
  (see :mod:`tracegen.client.tools`);
- ``finish_reason`` and usage (with ``completion_tokens_details.reasoning_tokens`` when reported);
- per-token top log-probs (``TeacherConfig.top_logprobs``), kept per channel: the entries of a chunk
  whose delta carries reasoning text are reasoning tokens, all others (content, native tool calls)
  content tokens. A non-streamed reply has one list for both, all kept as content tokens. Malformed
  entries are dropped, never failing the turn.

Retries: 408/409/429/5xx, connection errors, read timeouts and streams that end before a finish
reason are retried with exponential backoff and jitter, honouring ``Retry-After``, up to
``max_attempts``. Anything else (a 400, a bad key) fails at once. Error messages carry the host and
model, never the key; server-provided text is scrubbed of the key before it is shown.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from tracegen.client import anthropic_messages, responses
from tracegen.client.http import Response, open_pool
from tracegen.client.tools import in_code, parse_arguments, parse_text_calls
from tracegen.client.wire import REASONING_ITEMS, loads
from tracegen.config import EndpointConfig, TeacherConfig, ToolProtocolSetting
from tracegen.errors import DeadlineError, RetryableTeacherError, TeacherError
from tracegen.records import (
    AssistantMessage,
    ReasoningFormat,
    TokenLogprob,
    ToolCall,
    ToolProtocol,
    TopLogprob,
    Usage,
)

RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504, 520, 522, 524, 529}


class RateLimiter:
    """Client-side requests-per-minute and tokens-per-minute limits (token buckets).

    Tokens are charged after each reply from its reported usage; a request waits while the token
    bucket is in debt. This keeps a run under a provider's quota instead of living off 429s.
    """

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next_slot = 0.0
        self._tpm = tokens_per_minute
        self._tokens = tokens_per_minute or 0.0
        self._refilled_at = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if not self._interval and not self._tpm:
            return
        async with self._lock:
            now = time.monotonic()
            if self._interval:
                slot = max(now, self._next_slot)
                self._next_slot = slot + self._interval
                if slot > now:
                    await asyncio.sleep(slot - now)
            while self._tpm and self._refill() < 0:
                await asyncio.sleep(min(5.0, -self._tokens / (self._tpm / 60.0)))

    def charge(self, tokens: int) -> None:
        if self._tpm:
            self._refill()
            self._tokens -= tokens

    def _refill(self) -> float:
        assert self._tpm
        now = time.monotonic()
        self._tokens = min(self._tpm, self._tokens + (now - self._refilled_at) * self._tpm / 60.0)
        self._refilled_at = now
        return self._tokens


class ChatClient:
    """One endpoint (teacher, simulator or judge). Create and use it inside the running event loop."""

    def __init__(self, config: EndpointConfig, role: str = "teacher") -> None:
        base_url = config.url()
        if not base_url or not config.model:
            missing = "base_url" if not base_url else "model"
            flag = f"--{role}-{'base-url' if missing == 'base_url' else 'model'}"
            raise TeacherError(
                f"no {role} {missing} configured",
                hint=f"pass {flag}, set TRACEGEN_{role.upper()}_{missing.upper()}, or set it in the recipe",
            )
        self.config = config
        self.role = role
        self.model: str = config.model
        self.base_url = base_url.rstrip("/")
        self.host = urlsplit(self.base_url).netloc or self.base_url
        self._key = config.api_key()
        teacher = config if isinstance(config, TeacherConfig) else None
        self.api = teacher.api if teacher else "chat"
        self._effort = teacher.reasoning_effort if teacher else None
        auth = (
            {"x-api-key": self._key, "anthropic-version": anthropic_messages.VERSION}
            if self.api == "anthropic"
            else {"Authorization": f"Bearer {self._key}"}
        )
        self._headers = {**auth, "Content-Type": "application/json", "Accept": "text/event-stream"}
        self._pool = open_pool(self.base_url, config.connect_timeout_s, config.timeout_s)
        self._deadline_s = config.request_deadline_s()
        self._limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self._sdk: Any = None  # the openai SDK client, built on first non-streaming request
        self.requests = 0
        self.retries = 0

    async def aclose(self) -> None:
        await self._pool.aclose()
        if self._sdk is not None:
            await self._sdk.close()

    def body(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, seed_offset: int = 0
    ) -> dict[str, Any]:
        """The request body; a setting that is None is not sent (reasoning models refuse sampling keys)."""
        cfg = self.config
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if cfg.temperature is not None:
            body["temperature"] = cfg.temperature
        if cfg.top_p is not None:
            body["top_p"] = cfg.top_p
        teacher = cfg if isinstance(cfg, TeacherConfig) else None
        if teacher and teacher.max_completion_tokens is not None:
            body["max_completion_tokens"] = teacher.max_completion_tokens
        elif cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        if teacher and teacher.reasoning_effort is not None:
            body["reasoning_effort"] = teacher.reasoning_effort
        if cfg.seed is not None:
            body["seed"] = cfg.seed + seed_offset
        if tools:
            body["tools"] = tools
        if teacher and teacher.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = teacher.top_logprobs
        for key, value in cfg.extra_body.items():
            if value is None:
                body.pop(key, None)  # extra_body {key: null} removes a key too
            else:
                body[key] = value
        return body

    async def complete(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        tool_protocol: ToolProtocolSetting | None = None,
        call_id_prefix: str = "call",
        seed_offset: int = 0,
    ) -> AssistantMessage:
        """One assistant turn, retried per the module docstring; raises TeacherError when it gives up.

        ``tool_protocol`` says where to look for tool calls (None: nowhere, e.g. for the simulator).
        ``seed_offset`` is added to a configured seed: the K samples of a task must not share one, or a
        seeded server returns K identical samples.
        """
        body = self.body(messages, tools, seed_offset)
        attempt = 0
        while True:
            attempt += 1
            await self._limiter.acquire()
            self.requests += 1
            started = time.monotonic()
            try:
                if self.config.stream or self.api != "chat":
                    raw = await self._post(body, started, self.config.stream)
                else:  # non-streamed chat completions go through the SDK
                    raw = await self._sdk_request(body, started)
            except RetryableTeacherError as exc:
                if attempt >= self.config.max_attempts:
                    raise TeacherError(
                        f"{self.role} {self.model}@{self.host} failed after {attempt} attempts: {exc.message}",
                        hint="check the server's health and rate limits; raise max_attempts to retry longer",
                        status=exc.status,
                    ) from exc
                self.retries += 1
                await asyncio.sleep(self._backoff(attempt, exc.retry_after_s))
                continue
            self._limiter.charge(raw.usage.total_tokens)
            return assemble(raw, tool_protocol, call_id_prefix, attempts=attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            retry_after = min(retry_after, self.config.retry_after_max_s)  # `inf` or a day would wait forever
            return retry_after + random.uniform(0, 0.1 * max(retry_after, 0.1))
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2.0 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    async def _post(self, body: dict[str, Any], started: float, stream: bool = True) -> RawReply:
        """One request through the pool: streamed (events folded in as they come), or, for the Responses and
        Messages APIs with ``stream: false``, the whole reply object folded in at once."""
        handler: EventHandler
        whole: WholeHandler | None = None  # chat completions' non-streamed path is the SDK's
        if self.api == "responses":
            path, handler, whole = "/responses", responses.handle_event, responses.handle_response
            payload = json.dumps(responses.responses_body(body, self._effort, stream)).encode()
        elif self.api == "anthropic":
            path, handler, whole = "/messages", anthropic_messages.handle_event, anthropic_messages.handle_message
            payload = json.dumps(anthropic_messages.anthropic_body(body, stream)).encode()
        else:
            path, handler = "/chat/completions", _handle_event
            payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
        reply = RawReply()
        try:
            # The pool's read timeout bounds each silence; this bounds the whole request (a stream that
            # trickles tokens or keep-alive comments forever).
            async with asyncio.timeout(self._deadline_s) as total:
                async with self._pool.post(path, payload, self._headers) as resp:
                    if resp.status != 200:
                        text = (await resp.read()).decode("utf-8", "replace")
                        raise self._status_error(resp.status, text, resp.headers.get("retry-after"))
                    if stream or whole is None:
                        done = await _read_sse(resp, reply, started, self.scrub, handler)
                    else:
                        whole(loads(await resp.read()), reply, self.scrub)
                        done = True
        except TimeoutError as exc:
            if total.expired():
                raise DeadlineError(
                    f"{self.role} {self.model}@{self.host}: request exceeded its deadline of {self._deadline_s:g} s",
                    hint="raise request_timeout_s if replies this long are expected",
                ) from exc
            raise RetryableTeacherError(f"no data for {self.config.timeout_s:g} s (read timeout)") from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            raise RetryableTeacherError(f"connection failed ({self.scrub(str(exc)) or type(exc).__name__})") from exc
        except ValueError as exc:  # a chunk or event that does not parse
            raise RetryableTeacherError(f"malformed response ({self.scrub(str(exc), 200)})") from exc
        if not done and reply.finish_reason is None:
            raise RetryableTeacherError("stream ended before a finish reason (dropped connection?)")
        reply.latency_s = time.monotonic() - started
        if not stream:
            reply.ttft_s = reply.latency_s
        return reply

    async def preflight(self) -> None:
        """One cheap request before the first trajectory, so a wrong URL, key or model fails in seconds.

        ``GET /models``: a refused connection, 401/403, or a model the list lacks is a TeacherError (the
        message lists what the server offers). Where ``/models`` is absent (404/405), a request with no
        messages checks the key and the model without generating anything. Anything else (5xx, 429) is
        left to the run's retries.
        """
        where = f"{self.role} {self.model}@{self.host}"
        try:
            async with asyncio.timeout(self.config.connect_timeout_s + 5):
                async with self._pool.get("/models", self._headers) as resp:
                    status, text = resp.status, (await resp.read()).decode("utf-8", "replace")
                if status in (404, 405):
                    path, body = self._probe()
                    async with self._pool.post(path, json.dumps(body).encode(), self._headers) as resp:
                        status, text = resp.status, (await resp.read()).decode("utf-8", "replace")
                    if status in (401, 403, 404):
                        raise self._status_error(status, text, None)
                    return
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            reason = self.scrub(str(exc)) or type(exc).__name__
            raise TeacherError(
                f"cannot reach {where} ({reason})",
                hint=f"check that the server is running and that {self.role}.base_url ({self.base_url}) is right",
            ) from exc
        if status in (401, 403):
            raise self._status_error(status, text, None)
        if status != 200:
            return
        try:
            offered = [str(m["id"]) for m in json.loads(text)["data"]]
        except (ValueError, KeyError, TypeError):
            return  # not an OpenAI model list: nothing to check against
        if self.model not in offered and f"models/{self.model}" not in offered:
            shown = ", ".join(offered[:20]) + (f" (and {len(offered) - 20} more)" if len(offered) > 20 else "")
            raise TeacherError(
                f"{where}: the server does not offer model {self.model!r}; it offers: {shown or 'none'}",
                hint=f"set {self.role}.model to one of those (or {self.role}.preflight: false if it serves "
                "names it does not list)",
                status=404,
            )

    def _probe(self) -> tuple[str, dict[str, Any]]:
        """The preflight's request where ``/models`` is absent: this API's endpoint, nothing to generate
        from (an empty input is a 400; a bad key or an unknown model is still a 401/403/404)."""
        if self.api == "responses":
            return "/responses", {"model": self.model, "input": [], "max_output_tokens": 16}
        if self.api == "anthropic":
            return "/messages", {"model": self.model, "messages": [], "max_tokens": 1}
        return "/chat/completions", {"model": self.model, "messages": [], "max_tokens": 1}

    async def _sdk_request(self, body: dict[str, Any], started: float) -> RawReply:
        import openai  # not on the streaming hot path

        if self._sdk is None:
            self._sdk = openai.AsyncOpenAI(
                api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self.config.timeout_s
            )
        known = {
            "model",
            "messages",
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
            "reasoning_effort",
            "seed",
            "tools",
            "logprobs",
            "top_logprobs",
        }
        try:
            completion = await self._sdk.chat.completions.create(
                **{k: v for k, v in body.items() if k in known},
                extra_body={k: v for k, v in body.items() if k not in known} or None,
            )
        except openai.APIStatusError as exc:
            raise self._status_error(
                exc.status_code, exc.response.text, exc.response.headers.get("retry-after")
            ) from exc
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise RetryableTeacherError(f"connection failed ({type(exc).__name__})") from exc
        data = completion.model_dump()
        reply = RawReply()
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        reply.apply_delta(message)  # a whole message folds in like one big delta
        reply.add_logprobs(choice.get("logprobs"), None)  # reasoning and content tokens in one list
        reply.finish_reason = choice.get("finish_reason")
        reply.set_usage(data.get("usage"))
        reply.latency_s = reply.ttft_s = time.monotonic() - started
        return reply

    def _status_error(self, status: int, text: str, retry_after: str | None) -> TeacherError:
        detail, param = _error_detail(text)
        message = f"{self.role} {self.model}@{self.host} answered HTTP {status}: {self.scrub(detail)}"
        if status in RETRYABLE_STATUS:
            return RetryableTeacherError(message, status=status, retry_after_s=_parse_retry_after(retry_after))
        hint = {
            401: f"set the API key in ${self.config.api_key_env} (or $OPENAI_API_KEY)",
            403: f"the key in ${self.config.api_key_env} lacks access to this model",
            404: "check the base URL (it usually ends in /v1) and the model name",
        }.get(status, "check the request settings in the recipe")
        if status == 400:
            hint = _parameter_hint(param, detail, self.role) or hint
        return TeacherError(message, hint=hint, status=status)

    def scrub(self, text: str, limit: int = 300) -> str:
        """Server text made safe to record: the key removed first, then cut (a cut key would survive)."""
        if self._key and self._key != "EMPTY":
            text = text.replace(self._key, "***")
        return text[:limit]


_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "max_completion_tokens", "reasoning_effort", "seed")


def _parameter_hint(param: str | None, detail: str, role: str) -> str | None:
    """What to change when a 400 names a request parameter (OpenAI's reasoning models refuse several)."""
    if param is None:
        param = next((key for key in _SAMPLING_KEYS if f"'{key}'" in detail or f"`{key}`" in detail), None)
    if param == "max_tokens":
        return f"this model refuses max_tokens: set {role}.max_completion_tokens (it is sent instead)"
    if param in _SAMPLING_KEYS:
        return f"this model refuses {param}: set `{role}.{param}: null` in the recipe so it is not sent"
    return None


class RawReply:
    """A reply being assembled, from stream deltas or a whole message."""

    __slots__ = (
        "content",
        "content_logprobs",
        "details",
        "finish_reason",
        "items",
        "latency_s",
        "reasoning",
        "reasoning_format",
        "reasoning_logprobs",
        "refusal",
        "tools",
        "ttft_s",
        "usage",
    )

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        self.details: list[Any] = []  # reasoning_details entries (OpenRouter), merged in assemble()
        self.items: list[Any] = []  # whole reasoning items (Responses API), echoed verbatim
        self.content_logprobs: list[Any] = []  # the server's raw entries, checked in assemble()
        self.reasoning_logprobs: list[Any] = []
        self.reasoning_format: ReasoningFormat | None = None
        self.tools: list[dict[str, Any]] = []
        self.finish_reason: str | None = None
        self.usage = Usage()
        self.latency_s = 0.0
        self.ttft_s: float | None = None

    def apply_delta(self, delta: dict[str, Any]) -> bool:
        """Fold one delta in; True when it carried generated text or a call.

        The loop runs over the keys the delta has (one or two on the hot path), not over every key it might.
        """
        got = False
        for key, value in delta.items():
            if not value:
                continue
            if key == "content":
                if type(value) is str:
                    self.content.append(value)
                else:
                    self.add_parts(value)
                got = True
            elif key == "reasoning" or key == "reasoning_content":
                if type(value) is not str or (key == "reasoning_content" and _text(delta.get("reasoning"))):
                    continue  # vLLM sends both during its rename and reads only `reasoning` back: prefer it
                self.reasoning.append(value)
                self.reasoning_format = "reasoning" if key == "reasoning" else "reasoning_content"
                got = True
            elif key == "tool_calls":
                for call in value:
                    self.add_tool_delta(call)
                got = True
            elif key == "refusal":
                if isinstance(value, str):
                    self.refusal.append(value)
                    got = True
            elif key == "reasoning_details" and isinstance(value, list):
                self.details += value
        return got

    def mark_first_token(self, started: float) -> None:
        if self.ttft_s is None:
            self.ttft_s = time.monotonic() - started

    def add_parts(self, parts: Any) -> None:
        """``content`` as a list of typed parts: text parts are content, thinking parts reasoning (Mistral
        Magistral, https://docs.mistral.ai/capabilities/reasoning/). A part of another type fails the turn."""
        for part in parts if isinstance(parts, list) else [parts]:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("text", "output_text"):
                self.content.append(str(part.get("text") or ""))
            elif kind in ("thinking", "reasoning"):
                thought = part.get("thinking", part.get("text"))
                if isinstance(thought, list):
                    thought = "".join(str(t.get("text") or "") for t in thought if isinstance(t, dict))
                self.reasoning.append(str(thought or ""))
                self.reasoning_format = "content_parts"
            else:
                raise TeacherError(
                    f"unreadable content part (type {kind!r}) in the reply",
                    hint="this server's reply shape is not supported; report it with the server's name",
                )

    def add_logprobs(self, logprobs: Any, delta: dict[str, Any] | None) -> None:
        """Keep a choice's ``logprobs.content`` entries, as reasoning tokens when ``delta`` carries reasoning."""
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
        if not isinstance(entries, list):
            return
        if delta and (delta.get("reasoning_content") or delta.get("reasoning")):
            self.reasoning_logprobs += entries
        else:
            self.content_logprobs += entries

    def add_tool_delta(self, call: dict[str, Any]) -> None:
        """One tool-call delta, matched to its call by ``index``, else by ``id`` (some servers send no
        index), else to the call in progress; an index reused with a new id starts a new call."""
        cid = call.get("id")
        index = call.get("index")
        slot = None
        if cid:
            slot = next((t for t in self.tools if t["id"] == cid), None)
        if slot is None and index is not None:
            slot = next((t for t in self.tools if t["index"] == index), None)
            if slot is not None and cid and slot["id"] and slot["id"] != cid:
                slot = None
        if slot is None and index is None and not cid and self.tools:
            slot = self.tools[-1]
        if slot is None:
            slot = {"id": None, "index": index, "name": "", "arguments": "", "echo": None}
            self.tools.append(slot)
        if cid:
            slot["id"] = cid
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["name"] += fn["name"]
        if fn.get("arguments"):
            slot["arguments"] += fn["arguments"]
        if call.get("extra_content"):  # Gemini's thought signature: echoed back verbatim
            slot["echo"] = {"extra_content": call["extra_content"]}

    def set_usage(self, usage: dict[str, Any] | None) -> None:
        if not usage:
            return
        details = usage.get("completion_tokens_details") or {}
        self.usage = Usage(
            prompt_tokens=usage.get("prompt_tokens") or 0,
            completion_tokens=usage.get("completion_tokens") or 0,
            reasoning_tokens=(details.get("reasoning_tokens") if isinstance(details, dict) else 0) or 0,
        )


def _text(value: Any) -> bool:
    """A non-empty string."""
    return bool(value) and isinstance(value, str)


_SSE_STARTS = (b"data:", b":", b"event:", b"id:", b"retry:")


EventHandler = Callable[[bytes, "RawReply", float, Callable[[str], str]], bool]
"""One API's streamed event (its data), folded into the reply; True when the stream said it is over."""
WholeHandler = Callable[[Any, "RawReply", Callable[[str], str]], None]
"""One API's whole (non-streamed) reply object, folded into the reply."""


async def _read_sse(
    resp: Response, reply: RawReply, started: float, scrub: Callable[[str], str], handle: EventHandler
) -> bool:
    """Fold every SSE event of ``resp`` into ``reply`` with ``handle`` (one API's events); True when the
    stream said it is over (``[DONE]``, ``response.completed``).

    The hot path. Lines end in LF, CRLF or CR; an event's ``data:`` lines are joined with LF and the
    event is handled at the blank line that ends it (or at the end of the body); comments and other
    fields are skipped (https://html.spec.whatwg.org/multipage/server-sent-events.html). Work is linear
    in the bytes received: an incomplete line is kept as pieces, joined once when its end arrives. The
    body is read to its end even after ``[DONE]``, so the connection can serve the next request.
    """
    pieces: list[bytes] = []  # the current incomplete line
    data: list[bytes] = []  # the current event's data lines
    junk: list[bytes] | None = None  # the body, when it is not an event stream
    done = checked = carry_cr = False
    declared = "text/event-stream" in resp.headers.get("content-type", "")
    async for chunk in resp.iter_bytes():
        if done or not chunk:
            continue
        if not checked:
            checked = True
            if not declared and not chunk.lstrip().startswith(_SSE_STARTS):
                junk = []
        if junk is not None:
            junk.append(chunk)
            continue
        if carry_cr or b"\r" in chunk:
            if carry_cr and chunk[:1] == b"\n":
                chunk = chunk[1:]  # the LF of a CRLF split across two chunks
            carry_cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            pieces.append(chunk)
            continue
        lines = chunk.split(b"\n")
        if pieces:
            pieces.append(lines[0])
            lines[0] = b"".join(pieces)
            pieces = []
        tail = lines.pop()
        if tail:
            pieces.append(tail)
        for line in lines:
            if line:
                if line.startswith(b"data:"):
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                continue  # comments, event names, ids
            if not data:
                continue
            payload = data[0] if len(data) == 1 else b"\n".join(data)
            data = []
            if handle(payload, reply, started, scrub):
                done = True
                break
    if junk is not None:
        raise TeacherError(_not_sse(resp.headers, b"".join(junk), scrub), hint=_NOT_SSE_HINT)
    if not done and pieces:
        line = b"".join(pieces)
        if line.startswith(b"data:"):
            data.append(line[6:] if line[5:6] == b" " else line[5:])
    if not done and data:  # a last event without its blank line
        done = handle(b"\n".join(data), reply, started, scrub)
    return done


def _handle_event(payload: bytes, reply: RawReply, started: float, scrub: Callable[[str], str]) -> bool:
    """One event's data; True for ``[DONE]``."""
    if payload == b"[DONE]":
        return True
    event = loads(payload)
    if "error" in event:
        err = event["error"]
        detail = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        raise RetryableTeacherError(f"server error mid-stream: {scrub(detail)}")
    choices = event.get("choices")
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if delta and reply.apply_delta(delta) and reply.ttft_s is None:
            reply.ttft_s = time.monotonic() - started
        logprobs = choice.get("logprobs")  # the only cost when log-probs were not asked for
        if logprobs:
            reply.add_logprobs(logprobs, delta)
        if choice.get("finish_reason"):
            reply.finish_reason = choice["finish_reason"]
    if event.get("usage"):
        reply.set_usage(event["usage"])
    return False


_NOT_SSE_HINT = "check base_url: it must be the API root (usually ending in /v1), not a web page or a proxy's"


def _not_sse(headers: dict[str, str], body: bytes, scrub: Callable[[str], str]) -> str:
    """Name what a 200 answer to a streaming request held instead of an event stream."""
    kind = headers.get("content-type") or "no content type"
    encoding = headers.get("content-encoding", "identity")
    if encoding != "identity" or body[:2] == b"\x1f\x8b":
        return f"the server answered 200 with a compressed body (Content-Encoding: {encoding}, {kind}), not events"
    start = scrub(body[:120].decode("utf-8", "replace")).strip()
    return f"the server answered 200 with {kind} ({len(body)} bytes, starting {start!r}), not an event stream"


def assemble(
    raw: RawReply, protocol: ToolProtocolSetting | None, call_id_prefix: str, attempts: int = 1
) -> AssistantMessage:
    """Turn a raw reply into the recorded assistant message: split reasoning, collect tool calls.

    For text protocols ``content`` keeps the call text verbatim (what the teacher wrote, and what is
    echoed back to it); the parsed calls are in ``tool_calls`` either way.
    """
    content = _whole_text(raw.content)
    reasoning: str | None = _whole_text(raw.reasoning) or None
    reasoning_format = raw.reasoning_format
    if reasoning is None:
        content, reasoning = _split_inline_think(content)
        if reasoning is not None:
            reasoning_format = "inline"
    calls: list[ToolCall] = []
    tool_protocol: ToolProtocol | None = None
    if raw.tools and protocol in ("auto", "native"):
        tool_protocol = "native"
        for i, slot in enumerate(raw.tools):
            _, error = parse_arguments(slot["arguments"])
            calls.append(
                ToolCall(
                    id=slot["id"] or f"{call_id_prefix}-{i}",
                    name=slot["name"],
                    arguments=_whole_text([slot["arguments"]]),
                    parse_error=error,
                    echo=slot["echo"],
                )
            )
    elif protocol is not None and protocol != "native":
        found = parse_text_calls(content, call_id_prefix, only=None if protocol == "auto" else protocol)
        tool_protocol, calls = found.protocol, found.calls
    return AssistantMessage(
        content=content,
        reasoning=reasoning,
        reasoning_format=reasoning_format,
        tool_calls=calls,
        tool_protocol=tool_protocol,
        finish_reason=raw.finish_reason,
        refusal=_whole_text(raw.refusal) or None,
        echo=_echo(raw),
        usage=raw.usage,
        latency_s=raw.latency_s,
        ttft_s=raw.ttft_s,
        attempts=attempts,
        reasoning_logprobs=_token_logprobs(raw.reasoning_logprobs),
        content_logprobs=_token_logprobs(raw.content_logprobs),
    )


def _echo(raw: RawReply) -> dict[str, Any] | None:
    """The opaque continuation state to send back with this turn, None when there is none."""
    if not raw.details and not raw.items:
        return None
    echo: dict[str, Any] = {}
    if raw.details:
        echo["reasoning_details"] = _merge_details(raw.details)
    if raw.items:
        echo[REASONING_ITEMS] = raw.items
    return echo


def _whole_text(parts: list[str]) -> str:
    """Joined deltas as valid text: a surrogate pair split across two deltas (each JSON-escaped on its
    own) is joined into its character, and a lone surrogate, which no record can hold, becomes U+FFFD."""
    text = "".join(parts)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _merge_details(entries: list[Any]) -> list[Any]:
    """Streamed ``reasoning_details`` pieces -> whole entries: pieces with one ``index`` are one entry
    (their text fields concatenated, other fields such as ``signature`` kept as last sent). A whole
    message's entries pass through as they came."""
    merged: dict[Any, dict[str, Any]] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        key = entry.get("index", f"#{n}")
        whole = merged.get(key)
        if whole is None:
            merged[key] = dict(entry)
            continue
        for field, value in entry.items():
            if field in ("text", "summary", "data") and isinstance(value, str):
                whole[field] = (whole.get(field) or "") + value
            elif value is not None:
                whole[field] = value
    return list(merged.values())


def _token_logprobs(entries: list[Any]) -> list[TokenLogprob] | None:
    """The server's ``logprobs.content`` entries as records (None when there are none).

    An entry that is not the OpenAI shape is dropped. Non-finite log-probs (JSON records cannot hold
    them): an alternative is dropped, a sampled token's is floored at ``LOGPROB_FLOOR`` so the token
    stays (the tokens must join back into the text the server sent).
    """
    tokens = []
    for entry in entries:
        try:
            top = [
                TopLogprob(token=t["token"], logprob=t["logprob"], bytes=t.get("bytes"))
                for t in entry.get("top_logprobs") or ()
            ]
            logprob = float(entry["logprob"])
            token = TokenLogprob(
                token=entry["token"],
                logprob=logprob if math.isfinite(logprob) else LOGPROB_FLOOR,
                bytes=entry.get("bytes"),
                top=[t for t in top if math.isfinite(t.logprob)],
            )
        except (KeyError, TypeError, AttributeError, ValueError, ValidationError):
            continue
        tokens.append(token)
    return tokens or None


LOGPROB_FLOOR = -1e4  # stands for a non-finite log-prob: probability 0 in float32


def _split_inline_think(content: str) -> tuple[str, str | None]:
    """Split inline thinking off the content: ``<think>r</think>c`` -> (c, r).

    Also ``r</think>`` + a line break + ``c``, when the chat template put the opening tag in the prompt
    (Qwen3 thinking models, DeepSeek-R1), and an unclosed ``<think>r`` (cut off by max_tokens), which is
    all reasoning. A tag quoted in an answer (in code, or mid-sentence) is text, not a reasoning block.
    """
    stripped = content.lstrip()
    opened = stripped.startswith("<think>")
    end = content.find("</think>")
    if end >= 0 and not in_code(content, end):
        before, after = content[:end].lstrip(), content[end + len("</think>") :]
        if opened:
            before = before[len("<think>") :]
        elif "<think>" in before or (after and not after.startswith(("\n", "\r"))):
            return content, None  # an opening tag mid-text, or a tag mid-sentence: not a reasoning block
        return after.lstrip("\n"), before.strip("\n")
    if opened and end < 0:
        return "", stripped[len("<think>") :].strip("\n")
    return content, None


def _error_detail(text: str) -> tuple[str, str | None]:
    """An error body's message (whole: the caller scrubs, then cuts) and the parameter it names."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip() or "(empty body)", None
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, list) and err:  # Gemini wraps its error object in a list
        err = err[0].get("error", err[0]) if isinstance(err[0], dict) else err[0]
    if not isinstance(err, dict):
        return str(err), None
    param = err.get("param")
    return str(err.get("message", err)), param if isinstance(param, str) else None


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None
