"""Hub and network failures explained: what failed and how to fix it, with the token redacted."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager


class GPHubError(RuntimeError):
    """A Hub request failed. The message says what failed and how to retry; the local copy is in ``local_dir``."""

    def __init__(self, message: str, local_dir: str | None = None):
        super().__init__(message)
        self.local_dir = local_dir


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def explain_hub_error(error: BaseException, action: str, token: str | None = None) -> str | None:
    """A one-paragraph explanation of a Hub failure, or ``None`` when ``error`` is not a Hub/network error."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    first_line = _redact(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__, token)
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


@contextmanager
def hub_errors(action: str, retry: str = "", local_dir: str | None = None, token: str | None = None) -> Iterator[None]:
    """Turn Hub and network errors inside the block into a ``GPHubError`` that explains them (token redacted)."""
    try:
        yield
    except GPHubError:
        raise
    except Exception as error:
        explanation = explain_hub_error(error, action, token)
        if explanation is None:
            raise
        raise GPHubError(" ".join(part for part in (explanation, retry) if part), local_dir=local_dir) from error
