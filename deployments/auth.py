"""API keys: Bearer tokens with scopes, read from an environment variable and/or a file (a mounted secret).

Scopes: `inference` (completions, chat, models) and `admin` (stats, metrics, the OpenAPI document); a key
may hold both. An entry is `KEY` (inference only) or `SCOPES:KEY` with SCOPES one of `inference`, `admin`,
`admin+inference` (or `all`); entries are separated by commas, spaces or newlines, `#` starts a comment.
A presented key is compared with every known key in constant time (digests, no early exit), and keys are
never logged: callers are named by `key_id`, a digest prefix.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

INFERENCE, ADMIN = "inference", "admin"
SCOPES = (INFERENCE, ADMIN)
MIN_KEY_LENGTH = 16
_SPLIT = re.compile(r"[\s,]+")


class AuthConfigError(ValueError):
    """The key sources are unusable (no keys, a malformed entry); the message never contains a key."""


@dataclass(frozen=True)
class Caller:
    """Who made a request: a key's id (a digest prefix, safe to log and to scope caches by)."""

    key_id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class AuthFailure:
    """401 (no key, or an unknown one) or 403 (a key without the scope the route needs)."""

    status: int
    message: str
    code: str


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def parse_entries(text: str, source: str) -> dict[str, frozenset[str]]:
    """Key -> scopes from entries as described in the module docstring; `source` names where they came from."""
    keys: dict[str, frozenset[str]] = {}
    for line_no, line in enumerate(text.splitlines(), 1):
        for entry in _SPLIT.split(line.split("#", 1)[0].strip()):
            if not entry:
                continue
            scopes, key = frozenset({INFERENCE}), entry
            head, sep, tail = entry.partition(":")
            if sep and (head == "all" or all(s in SCOPES for s in head.split("+"))):
                scopes, key = (frozenset(SCOPES) if head == "all" else frozenset(head.split("+"))), tail
            if len(key) < MIN_KEY_LENGTH:
                raise AuthConfigError(
                    f"{source}, line {line_no}: an API key must have at least {MIN_KEY_LENGTH} characters"
                )
            keys[key] = keys.get(key, frozenset()) | scopes
    return keys


class ApiKeys:
    """The known keys; `authorize` answers a request's Authorization header for a scope."""

    def __init__(self, keys: dict[str, frozenset[str]]):
        if not keys:
            raise AuthConfigError("authentication is on but no API keys were found")
        # digest -> (key id, scopes); digests have a fixed length, so compare_digest's time does not vary
        self._keys = [(hashlib.sha256(k.encode()).digest(), key_id(k), s) for k, s in keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    def lookup(self, presented: str) -> Caller | None:
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for known, kid, scopes in self._keys:  # every key is compared, so timing tells nothing of the match
            if hmac.compare_digest(digest, known):
                found = Caller(kid, scopes)
        return found

    def authorize(self, authorization: str | None, scope: str) -> Caller | AuthFailure:
        token = bearer_token(authorization)
        if token is None:
            return AuthFailure(401, "missing API key: send 'Authorization: Bearer <key>'", "invalid_api_key")
        caller = self.lookup(token)
        if caller is None:
            return AuthFailure(401, "incorrect API key provided", "invalid_api_key")
        if scope not in caller.scopes:
            return AuthFailure(403, f"this API key is not allowed to use {scope} endpoints", "insufficient_scope")
        return caller


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeySource:
    """Loads ApiKeys from `env` (a variable name) and `file`; a changed file is re-read (a rotated secret),
    checked at most every `recheck_s` seconds."""

    def __init__(self, env: str | None, file: str | None, recheck_s: float = 10.0, environ=os.environ):
        self.env, self.file, self.recheck_s, self.environ = env, file, recheck_s, environ
        self._stamp: tuple | None = None
        self._checked = 0.0
        self.keys = self._load()

    def _file_stamp(self) -> tuple | None:
        if not self.file:
            return None
        try:
            st = os.stat(self.file)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> ApiKeys:
        keys: dict[str, frozenset[str]] = {}
        if self.env and self.environ.get(self.env):
            keys.update(parse_entries(self.environ[self.env], f"${self.env}"))
        stamp = self._file_stamp()
        if self.file:
            try:
                text = Path(self.file).read_text()
            except OSError as e:
                raise AuthConfigError(f"cannot read the API key file {self.file}: {e.strerror}") from None
            for k, s in parse_entries(text, self.file).items():
                keys[k] = keys.get(k, frozenset()) | s
        if not keys:
            names = " or ".join(x for x in (f"${self.env}" if self.env else "", self.file or "") if x)
            raise AuthConfigError(f"authentication is on but no API keys were found in {names or 'any source'}")
        self._stamp = stamp
        return ApiKeys(keys)

    def current(self, now: float | None = None) -> ApiKeys:
        now = time.monotonic() if now is None else now
        if self.file and now - self._checked >= self.recheck_s:
            self._checked = now
            if self._file_stamp() != self._stamp:
                try:
                    self.keys = self._load()
                except AuthConfigError:  # a half-written secret: keep the keys we have
                    pass
        return self.keys
