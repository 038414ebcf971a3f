"""Helpers of the service tests: API tokens, their headers, and auth settings for test services."""

from __future__ import annotations

import socket
from pathlib import Path

from services.auth import AuthSettings, TokenStore

# the HTTP tests send bursts of requests: rate limits well above them (test_auth_http tests the limits)
ROOMY = dict(requests_per_minute=60_000, burst=1_000)


def make_token(tokens_file: Path, owner: str, *scopes: str) -> str:
    """A new token in ``tokens_file`` for ``owner`` with ``scopes`` (default: generate and submit)."""
    return TokenStore(tokens_file).create(owner, list(scopes) or ["generate", "submit"])[1]


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of ``token``."""
    return {"Authorization": f"Bearer {token}"}


def roomy_auth(tokens_file: Path, **extra) -> AuthSettings:
    """Auth on, tokens from ``tokens_file``, limits that the functional tests never reach."""
    return AuthSettings(tokens=str(tokens_file), **{**ROOMY, **extra})


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
