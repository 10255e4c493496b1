"""Who may call the admin API: bearer tokens from a file, normally a mounted Secret.

The file (YAML) names each token and what it may see:

    tokens:
      - name: platform-oncall      # recorded as the actor of every replay and purge
        token: "<at least 24 characters>"
        admin: true                # every tenant, and purge
      - name: acme-team
        token: "<another>"
        tenants: [acme, acme-staging]

A token is either admin or scoped to a list of tenants, never both and never neither,
and is printable ASCII without spaces (as an HTTP header carries it). The file is read
at start (the API refuses to start without one valid token) and again at every request,
so a rotated Secret takes effect without a restart. A changed file
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
import re
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

_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


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
    def _usable(cls, token: SecretStr) -> SecretStr:
        secret = token.get_secret_value()
        if not 24 <= len(secret) <= 4096:
            raise ValueError("a token must have at least 24 characters (and at most 4096)")
        if not _HEADER_SAFE.fullmatch(secret):
            # An HTTP header carries it: anything else would never match a request.
            raise ValueError("a token must be printable ASCII without spaces")
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


# The keys a token file may hold; any other key is named as "an unexpected key" in an
# error, never by itself (it may be a token put where a key belongs).
_KNOWN_KEYS = frozenset({"tokens", *_Token.model_fields})


def parse_tokens(text: str, *, source: str) -> dict[bytes, Caller]:
    """The callers a token file defines, keyed by the SHA-256 of their token. An error
    says where the file is wrong and never quotes it: the file holds secrets."""
    try:
        loaded = yaml.safe_load(text)
        parsed = _TokenFile.model_validate(loaded if loaded is not None else {})
    except yaml.MarkedYAMLError as exc:
        where = exc.problem_mark
        at = "" if where is None else f" at line {where.line + 1}, column {where.column + 1}"
        raise InvalidTokens(f"{source} is not YAML: {exc.problem or 'unreadable'}{at}") from None
    except yaml.YAMLError:
        raise InvalidTokens(f"{source} is not YAML") from None
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors(include_input=False)
        )
        raise InvalidTokens(f"{source}: {problems}") from None
    return {
        _digest(t.token.get_secret_value()): Caller(
            name=t.name, admin=t.admin, tenants=frozenset(TenantId(n) for n in t.tenants)
        )
        for t in parsed.tokens
    }


def _location(loc: tuple[int | str, ...]) -> str:
    parts = [
        str(p) if isinstance(p, int) or p in _KNOWN_KEYS else "(an unexpected key)" for p in loc
    ]
    return ".".join(parts) or "file"


class TokenFile:
    """The tokens of one file, read again at every request.

    The file is small, so each request reads it whole and compares it with the content
    last read: a change is seen however it was made (a Secret's symbolic links swapped,
    a file rewritten in place within one tick of the file system's clock) and only a
    change is parsed and logged. Requests are served one check at a time, so a change is
    logged once and a request never sees tokens from before a change another request
    already found.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        content = self._read()
        self._callers = self._parse(content)
        if not self._callers:
            raise InvalidTokens(
                f"{path}: tokens: the file lists no token; the admin API needs at least one "
                "to start (it never runs open)"
            )
        self._seen = hashlib.sha256(content).digest()
        self._unreadable = False
        log.info("admin API tokens read from %s: %d", path, len(self._callers))

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise InvalidTokens(
                f"cannot read the admin API tokens {self.path} ({exc.strerror}); set "
                "SOMABRAIN_ADMIN_TOKENS_FILE to a file of tokens (the API never runs open)"
            ) from None

    def _parse(self, content: bytes) -> dict[bytes, Caller]:
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidTokens(
                f"{self.path} is not UTF-8 text (byte {exc.start + 1} is not)"
            ) from None
        return parse_tokens(text, source=str(self.path))

    def _refresh(self) -> None:
        """Under the lock: take a changed file's tokens, or log why they are not taken."""
        try:
            content = self.path.read_bytes()
        except OSError as exc:
            self._gone(exc)
            return
        self._unreadable = False
        seen = hashlib.sha256(content).digest()
        if seen == self._seen:
            return
        self._seen = seen  # a bad file is reported once, not at every request
        try:
            self._callers = self._parse(content)
        except InvalidTokens as exc:
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
        digest = _digest(token)
        with self._lock:
            self._refresh()
            callers = self._callers
        found = None
        for known, caller in callers.items():
            if hmac.compare_digest(known, digest):
                found = caller
        return found
