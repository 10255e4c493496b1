"""Who may call the admin API: bearer tokens from a file, normally a mounted Secret.

The file (YAML) names each token and what it may see:

    tokens:
      - name: platform-oncall      # recorded as the actor of every replay and purge
        token: "<at least 24 characters>"
        admin: true                # every tenant, and purge
      - name: acme-team
        token: "<another>"
        tenants: [acme, acme-staging]

A token is either admin or scoped to a list of tenants, never both and never neither.
The file is read at start (the API refuses to start without one valid token) and again
whenever it changes, so a rotated Secret takes effect without a restart. A changed file
that does not parse, and a file that disappears or cannot be read, is logged as an
error once and the tokens read before stay in force: a Secret is swapped atomically, and
a moment without a readable file must not lock every operator out. A file that says
`tokens: []` is read as meant: every token is revoked and every request refused until
the file lists one again. `admin` takes a YAML boolean only (`true`, not the string
"yes").
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path
from typing import Annotated, Self

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, StrictBool, StringConstraints

from somabrain.config.errors import PermanentError
from somabrain.config.types import TENANT_ID_PATTERN, TenantId

log = logging.getLogger(__name__)

TenantName = Annotated[str, StringConstraints(pattern=TENANT_ID_PATTERN)]


class InvalidTokens(PermanentError):
    """The token file is missing, empty or malformed, or lists no token at start: the
    admin API does not start."""


class _Token(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][-A-Za-z0-9._@]*$")
    token: SecretStr
    # Strict: a quoted "yes" or "false" is a mistake to report, never a value to guess.
    admin: StrictBool = False
    tenants: list[TenantName] = Field(default_factory=list)

    @pydantic.field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr) -> SecretStr:
        if not 24 <= len(token.get_secret_value()) <= 4096:
            raise ValueError("a token must have at least 24 characters (and at most 4096)")
        return token

    @pydantic.model_validator(mode="after")
    def _one_scope(self) -> Self:
        if self.admin == bool(self.tenants):
            raise ValueError(
                f"token {self.name}: give it either `admin: true` or a list of `tenants`"
            )
        return self


class _TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Required, and may be empty once the API runs: `tokens: []` revokes every token.
    tokens: list[_Token]

    @pydantic.model_validator(mode="after")
    def _unique(self) -> Self:
        names = [t.name for t in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("token names must be unique (each is the actor in the audit trail)")
        secrets = [t.token.get_secret_value() for t in self.tokens]
        if len(set(secrets)) != len(secrets):
            raise ValueError("two entries have the same token")
        return self


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """The holder of one token."""

    name: str
    admin: bool
    tenants: frozenset[TenantId]

    def may_see(self, tenant: str) -> bool:
        return self.admin or tenant in self.tenants


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, *, source: str) -> dict[bytes, Caller]:
    """The callers a token file defines, keyed by the SHA-256 of their token."""
    try:
        loaded = yaml.safe_load(text)
        parsed = _TokenFile.model_validate(loaded if loaded is not None else {})
    except yaml.YAMLError as exc:
        raise InvalidTokens(f"{source} is not YAML: {exc}") from exc
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise InvalidTokens(f"{source}: {problems}") from None
    return {
        _digest(t.token.get_secret_value()): Caller(
            name=t.name, admin=t.admin, tenants=frozenset(TenantId(n) for n in t.tenants)
        )
        for t in parsed.tokens
    }


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    # The change time too: a file made readable by chmod is read again.
    return stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


class TokenFile:
    """The tokens of one file, re-read when it changes (or is replaced)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp, self._callers = self._read()
        if not self._callers:
            raise InvalidTokens(
                f"{path}: tokens: the file lists no token; the admin API needs at least one "
                "to start (it never runs open)"
            )
        self._unreadable = False
        log.info("admin API tokens read from %s: %d", path, len(self._callers))

    def _read(self) -> tuple[tuple[int, int, int], dict[bytes, Caller]]:
        try:
            stat = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidTokens(
                f"cannot read the admin API tokens {self.path} ({exc.strerror}); set "
                "SOMABRAIN_ADMIN_TOKENS_FILE to a file of tokens (the API never runs open)"
            ) from exc
        return _identity(stat), parse_tokens(text, source=str(self.path))

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            self._gone(exc)
            return
        self._unreadable = False
        if _identity(stat) == self._stamp:
            return
        with self._lock:
            try:
                self._stamp, self._callers = self._read()
            except InvalidTokens as exc:
                # Keep what was read before, and do not read the same bad file again.
                self._stamp = _identity(stat)
                log.error(
                    "admin API tokens not changed: %s; the %d tokens read before stay in "
                    "effect until the file holds valid tokens",
                    exc,
                    len(self._callers),
                )
                return
        if self._callers:
            log.info("admin API tokens re-read from %s: %d", self.path, len(self._callers))
        else:
            log.warning(
                "admin API tokens file %s lists no token: every token is revoked and every "
                "request refused with 401 until the file lists one",
                self.path,
            )

    def _gone(self, exc: OSError) -> None:
        """Log, once until the file is back, that it cannot be read; keep the tokens."""
        with self._lock:
            if self._unreadable:
                return
            self._unreadable = True
        log.error(
            "admin API tokens file %s cannot be read (%s); the %d tokens read before stay "
            "in effect: restore the file (or its Secret), or point "
            "SOMABRAIN_ADMIN_TOKENS_FILE at the file that holds them",
            self.path,
            exc.strerror,
            len(self._callers),
        )

    def caller(self, token: str) -> Caller | None:
        """Who holds this token, or None. Compared in constant time."""
        self._refresh()
        digest = _digest(token)
        found = None
        for known, caller in self._callers.items():
            if hmac.compare_digest(known, digest):
                found = caller
        return found
