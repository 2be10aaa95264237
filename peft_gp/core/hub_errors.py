"""Hub and network failures explained: what failed and how to fix it, with the token kept out of every message, every
chained exception and every log record written while a Hub request runs."""

from __future__ import annotations

import importlib
import logging
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager


class GPHubError(RuntimeError):
    """A Hub request failed. The message says what failed and how to retry; the local copy is in ``local_dir``.

    It never chains the error it explains (``__cause__`` and ``__context__`` are ``None``): the HTTP client's errors
    hold the request, whose ``Authorization`` header is the token.
    """

    def __init__(self, message: str, local_dir: str | None = None):
        super().__init__(message)
        self.local_dir = local_dir


_BEARER = re.compile(r"(?i)\b(bearer\s+)[^\s'\",;)}\]]+")
REDACTED = "<token>"


def redact(text: str, token: str | None) -> str:
    """``text`` without ``token`` (and without any ``Bearer <credential>``)."""
    if token:
        text = text.replace(token, REDACTED)
    return _BEARER.sub(lambda match: match.group(1) + REDACTED, text)


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error``, then its causes and contexts (the HTTP error is often wrapped, e.g. by an LFS upload)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen and len(seen) < 16:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException, token: str | None) -> str:
    text = str(error).strip()
    return redact(text.splitlines()[0] if text else type(error).__name__, token)


def explain_hub_error(error: BaseException, action: str, token: str | None = None) -> str | None:
    """A one-paragraph explanation of a Hub failure, or ``None`` when ``error`` is not a Hub/network error.

    The chain of causes is searched, so an upload error wrapped by ``huggingface_hub`` (``Error while uploading
    'gp_memory.safetensors' to the Hub``) is explained by the network error inside it.
    """
    for inner in _chain(error):
        explanation = _explain_one(inner, action, token)
        if explanation is not None:
            if inner is not error:  # say which upload failed
                explanation += f" ({_first_line(error, token)})"
            return explanation
    return None


def _explain_one(error: BaseException, action: str, token: str | None) -> str | None:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    first_line = _first_line(error, token)
    if isinstance(error, OfflineModeIsEnabled):
        return f"{action} failed: HF_HUB_OFFLINE is set, so no request may reach the Hub. Unset it to use the Hub."
    if isinstance(error, RevisionNotFoundError):
        return (
            f"{action} failed: the revision does not exist ({first_line}). Task branches are named task-01, task-02, "
            "...; list them with huggingface_hub.HfApi().list_repo_refs(repo_id)."
        )
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{action} failed: the repository does not exist or this token may not access it ({first_line}). Check "
            "the repo id, and for a private repo log in (HF_TOKEN or `hf auth login`)."
        )
    if isinstance(error, HfHubHTTPError):
        status = getattr(error.response, "status_code", None)
        if status == 401:
            return (
                f"{action} failed: the Hub rejected the credentials (401). Set HF_TOKEN to a valid token with write "
                "access, or run `hf auth login`."
            )
        if status == 403:
            return f"{action} failed: this token may not write to the repository (403). Use a token with write access."
        return f"{action} failed: the Hub answered {status}: {first_line}"
    if isinstance(error, (*_transport_errors(), ConnectionError, TimeoutError)):
        return (
            f"{action} failed: the Hub could not be reached or the connection broke off mid-request "
            f"({type(error).__name__}: {first_line}). Check the network (and HF_ENDPOINT), then retry."
        )
    if isinstance(error, LocalEntryNotFoundError):
        return (
            f"{action} failed: the Hub could not be reached and there is no cached copy ({first_line}). Check the "
            "network (and HF_ENDPOINT), then retry."
        )
    return None


def _transport_errors() -> tuple[type[BaseException], ...]:
    # The HTTP client under huggingface_hub (httpx2 in 2.x, httpx or requests before): network down, cut off, timeout.
    found = []
    candidates = [("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")]
    candidates.append(("requests", "Timeout"))
    for module_name, class_name in candidates:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _mentions_token(error: BaseException, token: str | None) -> bool:
    return bool(token) and token in "".join(traceback.format_exception(type(error), error, error.__traceback__))


class hub_errors:  # noqa: N801 - used as ``with hub_errors(...)``, like a function
    """Turn Hub and network errors inside the block into a ``GPHubError`` that explains them (token redacted).

    The ``GPHubError`` is raised without the original error chained to it (neither ``__cause__`` nor
    ``__context__``). Any other error whose text shows ``token`` becomes a ``GPHubError`` with the text redacted;
    the rest pass through unchanged.
    """

    def __init__(self, action: str, retry: str = "", local_dir: str | None = None, token: str | None = None):
        self.action, self.retry, self.local_dir, self.token = action, retry, local_dir, token

    def __enter__(self) -> hub_errors:
        return self

    def __exit__(self, kind, error, _traceback) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        if isinstance(error, GPHubError):  # already explained: passes through, unchained
            error.__cause__ = error.__context__ = None
            return False
        explanation = explain_hub_error(error, self.action, self.token)
        if explanation is None and not _mentions_token(error, self.token):
            return False  # not a Hub error: it passes through unchanged
        if explanation is None:
            explanation = f"{self.action} failed: {type(error).__name__}: {_first_line(error, self.token)}"
        raise_unchained(GPHubError(" ".join(p for p in (explanation, self.retry) if p), local_dir=self.local_dir))
        return False  # pragma: no cover - raise_unchained always raises


def raise_unchained(failure: BaseException) -> None:
    """Raise ``failure`` with no ``__cause__`` and no ``__context__``, even inside an ``except`` block."""
    try:
        raise failure from None
    except BaseException as raised:
        raised.__context__ = None
        raise


class _RedactingFilter(logging.Filter):
    def __init__(self, token: str | None):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: leave it to the handler
            return True
        clean = redact(message, self.token)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and _mentions_token(record.exc_info[1], self.token):
            record.msg = f"{record.msg} ({record.exc_info[0].__name__}: details redacted)"
            record.exc_info, record.exc_text = None, None
        return True


HTTP_LOGGERS = ("huggingface_hub", "httpx2", "httpcore2", "httpx", "httpcore", "urllib3", "requests", "hf_xet")


@contextmanager
def redacted_logs(token: str | None) -> Iterator[None]:
    """While the block runs, log records of the Hub client and its HTTP stack carry no token (nor ``Bearer ...``).

    A filter is put on those loggers (and on every handler, for loggers created during the block) and taken off after.
    """
    manager = logging.Logger.manager
    names = [name for name in list(manager.loggerDict) if name.split(".")[0] in HTTP_LOGGERS]
    loggers = [logging.getLogger(name) for name in {*HTTP_LOGGERS, *names}]
    handlers = {id(h): h for lg in [logging.getLogger(), *loggers] for h in lg.handlers}.values()
    targets = [*loggers, *handlers]
    filtering = _RedactingFilter(token)
    for target in targets:
        target.addFilter(filtering)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(filtering)
