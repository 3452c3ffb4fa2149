"""One upload to the Hugging Face Hub (a dataset or a model repo): the token, one commit, errors that say why.

The token is ``huggingface_hub.get_token()``'s (``HF_TOKEN``, else the one ``hf auth login`` saved),
and never appears in a message. Files go up in one commit (``create_repo`` then ``create_commit``),
some of them as bytes built in memory, so the caller's folder is never touched before the Hub has
accepted the commit. A failure is told apart: no connection (DNS, refused, timeout: a network
problem, not the token), 401 (the token itself), 403 (the token's rights on the namespace), 5xx
(retried, then reported as the Hub's trouble).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tracegen.errors import BadInputError, TracegenError

RETRIES = 3
"""Attempts at the whole upload while the Hub answers 5xx."""


def hub_token() -> str:
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():  # huggingface_hub would refuse every request, after the checks
        raise BadInputError(
            "push needs the Hub, but offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set)",
            hint="unset HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE for this command",
        )

    token = get_token()
    if not token:
        raise BadInputError(
            "no Hugging Face token: HF_TOKEN is not set and `hf auth login` has not saved one",
            hint="run `hf auth login` (or export HF_TOKEN) with a write token from https://huggingface.co/settings/tokens",
        )
    return token


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise BadInputError(f"--repo-id {repo_id!r}: expected ORG/NAME")


def upload(
    repo_id: str,
    repo_type: str,
    files: dict[str, Path | bytes],
    *,
    private: bool,
    message: str,
    token: str,
    retry_wait_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Create the repo if needed and commit ``files`` (path in the repo -> local file or content) at once."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    for attempt in range(1, RETRIES + 1):
        try:
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            ops = [
                CommitOperationAdd(path, content if isinstance(content, bytes) else str(content))
                for path, content in sorted(files.items())
            ]
            api.create_commit(repo_id, ops, commit_message=message, repo_type=repo_type)
            return
        except HfHubHTTPError as exc:
            status = exc.response.status_code
            if status >= 500 and attempt < RETRIES:
                sleep(retry_wait_s * attempt)
                continue
            raise _http_error(repo_id, repo_type, status, _first_line(exc, token), attempt) from exc
        except Exception as exc:
            if not _is_network_error(exc):
                raise TracegenError(f"push to {repo_id} failed: {_first_line(exc, token)}") from exc
            raise TracegenError(
                f"push to {repo_id} failed: could not reach {api.endpoint} ({_first_line(exc, token)})",
                hint="a network failure, not the token: check the connection, a proxy, or HF_ENDPOINT, then push again",
            ) from exc


def _http_error(repo_id: str, repo_type: str, status: int, detail: str, attempts: int) -> TracegenError:
    org = repo_id.split("/")[0]
    if status == 401:
        return TracegenError(
            f"push to {repo_id} refused (401): the Hub does not accept the token",
            hint="the token is wrong, expired or revoked: run `hf auth login` again or export a valid HF_TOKEN",
        )
    if status == 403:
        return TracegenError(
            f"push to {repo_id} refused (403): the token may not create or write {repo_type} repos in '{org}'",
            hint=f"use a token with write access to '{org}' (a fine-grained token needs write on that namespace)",
        )
    if status >= 500:
        return TracegenError(
            f"push to {repo_id} failed: the Hub answered {status} on {attempts} attempt(s) ({detail})",
            hint="the Hub's own trouble, not yours: push again later (https://status.huggingface.co)",
        )
    return TracegenError(f"push to {repo_id} failed (HTTP {status}): {detail}")


def _is_network_error(exc: BaseException) -> bool:
    """Could not talk to the Hub at all: a socket error, or the HTTP client's transport errors."""
    seen: BaseException | None = exc
    while seen is not None:
        names = {cls.__name__ for cls in type(seen).__mro__}
        if isinstance(seen, ConnectionError | TimeoutError) or names & {"TransportError", "OfflineModeIsEnabled"}:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _first_line(exc: BaseException, token: str) -> str:
    text: Any = str(exc).replace(token, "***").strip()
    return text.splitlines()[0] if text else type(exc).__name__
