"""API tokens, scopes, and per-token rate limits for the HTTP service.

A token reads ``pcc_<id>_<secret>``: ``id`` names it (listing, revoking, logs), ``secret`` is
``secrets.token_urlsafe(32)``. Only the sha256 of the secret is stored, in ``<storage>/auth/tokens.json``
(written atomically, mode 0600, the folder 0700), with the token's owner and scopes. A plain sha256
suffices because the secret has 256 random bits (a slow password hash protects guessable secrets,
not random ones); verification compares digests in constant time.

Scopes: ``generate`` (POST /v1/generate, GET /v1/concepts), ``submit`` (the batch routes) and
``admin`` (every route, every owner's batches and concepts). The bearer scheme is FastAPI's
``HTTPBearer``, so the OpenAPI lists it under ``securitySchemes`` and on every protected operation.

Answers, in the service's error shape ``{"detail": ...}``: 401 with ``WWW-Authenticate: Bearer`` for a
missing, malformed, unknown or revoked token; 403 for a token without the route's scope; 429 with
``Retry-After`` past the token's rate (a token bucket: ``burst`` requests at once, refilled at
``requests_per_minute``). The bucket is written here (a few lines) rather than taken from a library
because it must live inside each ingress replica with no extra service; limits are per replica.

The token file is re-read when it changes, so ``purecc token create/revoke`` take effect on a running
service without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from purecc.fileio import fsync_dir
from purecc.ids import CONCEPT_ID_PATTERN

Scope = Literal["generate", "submit", "admin"]
SCOPES: tuple[Scope, ...] = ("generate", "submit", "admin")
PREFIX = "pcc"
TOKENS_FILE = "auth/tokens.json"
LOCAL_OWNER = "local"            # the owner of every request when auth is disabled
_OWNER = re.compile(CONCEPT_ID_PATTERN)
_TOKEN = re.compile(r"^pcc_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
CHALLENGE = {"WWW-Authenticate": "Bearer"}

bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="An API token `pcc_<id>_<secret>` from `purecc token create`.")


class AuthSettings(BaseModel):
    """Authentication, rate limits and per-owner quotas of the service (``ServiceConfig.auth``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Require a bearer token on every route but /healthz and the docs. "
                                            "Off only for a development server on 127.0.0.1.")
    tokens: Optional[str] = Field(None, description="The token file; default <storage>/auth/tokens.json. Without "
                                                    "either, every protected route answers 401.")
    requests_per_minute: float = Field(120.0, gt=0, description="Sustained requests per minute per token "
                                                                "(per ingress replica); more get 429.")
    burst: int = Field(30, ge=1, description="Requests a token may send at once before the rate applies.")
    max_training_batches: int = Field(4, ge=1, description="Batches of one owner with jobs queued or training "
                                                           "at once; a submission past it gets 429.")
    max_queued_concepts: int = Field(64, ge=1, description="Concepts of one owner queued or training at once; "
                                                           "a submission past it gets 429.")
    quota_retry_after_s: int = Field(60, ge=1, description="Retry-After of a quota's 429.")


@dataclass(frozen=True)
class TokenRecord:
    """A stored token: never the secret, only its sha256."""

    id: str
    owner: str
    scopes: tuple[str, ...]
    secret_sha256: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        """Not revoked."""
        return self.revoked_at is None


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: its token's owner and scopes (``token_id`` None when auth is off)."""

    owner: str
    scopes: frozenset[str]
    token_id: str | None = None

    @property
    def admin(self) -> bool:
        """Whether it may see and change every owner's batches and concepts."""
        return "admin" in self.scopes

    def may(self, scope: str) -> bool:
        """Whether it holds ``scope`` (admin holds every scope)."""
        return self.admin or scope in self.scopes


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def validate_owner(owner: str) -> str:
    """An owner name names a data folder (``<storage>/data/<owner>/``): the concept id rule."""
    if not isinstance(owner, str) or not _OWNER.fullmatch(owner):
        raise ValueError(f"owner: {owner!r} is not a valid owner name (expected {CONCEPT_ID_PATTERN})")
    return owner


class TokenStore:
    """The token file. ``create``/``revoke`` lock it and rewrite it atomically; ``verify`` re-reads it
    when it changed. Thread-safe."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._records: dict[str, TokenRecord] = {}

    # ----- reading ---------------------------------------------------------------------------
    def _read(self) -> dict[str, TokenRecord]:
        """The records, re-read when the file's mtime or size changed (an absent file: no tokens)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._seen, self._records = None, {}
            return self._records
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._seen:
            raw = json.loads(self.path.read_text())
            self._records = {r["id"]: TokenRecord(**{**r, "scopes": tuple(r["scopes"])}) for r in raw["tokens"]}
            self._seen = stamp
        return self._records

    def list(self) -> list[TokenRecord]:
        """Every token, revoked ones too, oldest first."""
        with self._lock:
            return sorted(self._read().values(), key=lambda r: r.created_at)

    def verify(self, token: str) -> TokenRecord | None:
        """The active record of ``token``, or None (malformed, unknown, wrong secret or revoked)."""
        match = _TOKEN.fullmatch(token or "")
        if match is None:
            return None
        with self._lock:
            rec = self._read().get(match.group(1))
        if rec is None or not hmac.compare_digest(rec.secret_sha256, _digest(match.group(2))):
            return None
        return rec if rec.active else None

    # ----- writing ---------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[dict[str, TokenRecord]]:
        """The records under an exclusive file lock (other processes' create/revoke wait); written back."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.path.parent / ".tokens.lock", "a") as lock, self._lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._seen = None
            records = dict(self._read())
            yield records
            self._write(records)

    def _write(self, records: dict[str, TokenRecord]) -> None:
        data = json.dumps({"tokens": [asdict(r) for r in records.values()]}, indent=2).encode()
        fd, tmp = tempfile.mkstemp(prefix=".tokens.", suffix=".tmp", dir=self.path.parent)
        try:          # mkstemp creates the file 0600: the hashes are never readable by others
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)
        self._seen = None

    def create(self, owner: str, scopes: list[str] | tuple[str, ...]) -> tuple[TokenRecord, str]:
        """A new token for ``owner`` with ``scopes``: its record and the token (shown once, never stored)."""
        validate_owner(owner)
        bad = [s for s in scopes if s not in SCOPES]
        if bad or not scopes:
            raise ValueError(f"scopes: {bad or 'none given'} (expected one or more of {', '.join(SCOPES)})")
        secret = secrets.token_urlsafe(32)
        with self._locked() as records:
            token_id = secrets.token_hex(6)
            while token_id in records:
                token_id = secrets.token_hex(6)
            rec = TokenRecord(token_id, owner, tuple(dict.fromkeys(scopes)), _digest(secret), time.time())
            records[token_id] = rec
        return rec, f"{PREFIX}_{token_id}_{secret}"

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke a token (idempotent); KeyError when there is no such token."""
        with self._locked() as records:
            rec = records.get(token_id)
            if rec is None:
                raise KeyError(f"no token with id {token_id!r}")
            if rec.active:
                rec = records[token_id] = TokenRecord(**{**asdict(rec), "revoked_at": time.time()})
        return rec


class RateLimiter:
    """One token bucket per key: ``burst`` requests at once, refilled at ``per_minute`` per minute."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = per_minute / 60.0, float(burst), clock
        self._buckets: dict[str, tuple[float, float]] = {}      # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Take one request for ``key``: 0 if allowed, else the seconds until one is."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


class Authority:
    """Turns a request's bearer credentials into a ``Principal`` for one scope, or an HTTP error."""

    def __init__(self, settings: AuthSettings, tokens_file: str | None):
        self.settings = settings
        self.store = TokenStore(tokens_file) if tokens_file else None
        self.limiter = RateLimiter(settings.requests_per_minute, settings.burst)

    def authenticate(self, credentials: HTTPAuthorizationCredentials | None, scope: Scope) -> Principal:
        """The principal of a request needing ``scope``; raises HTTPException 401, 403 or 429."""
        if not self.settings.enabled:
            return Principal(LOCAL_OWNER, frozenset(SCOPES))
        if credentials is None:
            raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer pcc_<id>_<secret>' "
                                     "(create one with `purecc token create`)", headers=CHALLENGE)
        if self.store is None:
            raise HTTPException(401, "this service has no token file configured (auth.tokens or storage), so "
                                     "no token is valid", headers=CHALLENGE)
        try:
            rec = self.store.verify(credentials.credentials)
        except (OSError, ValueError, KeyError, TypeError):
            raise HTTPException(503, "the token file cannot be read now", headers={"Retry-After": "5"}) from None
        if rec is None:
            raise HTTPException(401, "invalid token: unknown, revoked or malformed", headers=CHALLENGE)
        principal = Principal(rec.owner, frozenset(rec.scopes), rec.id)
        if not principal.may(scope):
            raise HTTPException(403, f"token {rec.id} lacks the {scope!r} scope needed here "
                                     f"(it has: {', '.join(rec.scopes)})")
        wait = self.limiter.take(rec.id)
        if wait > 0:
            raise HTTPException(429, f"rate limit: token {rec.id} may send {self.settings.requests_per_minute:g} "
                                     f"requests per minute (bursts of {self.settings.burst}); retry later",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        return principal


def require(scope: Scope, authority: Callable[[], Authority]) -> Callable[..., Principal]:
    """A FastAPI dependency: the request's ``Principal`` for ``scope``; ``authority()`` gives the
    serving replica's ``Authority``."""
    async def dependency(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> Principal:
        return authority().authenticate(credentials, scope)
    dependency.__name__ = f"require_{scope}"
    return dependency
