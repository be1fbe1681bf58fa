"""API keys: generation, hashing and the lookup table built from the policy and a key file.

Keys are 256-bit random strings, so a plain SHA-256 is a safe way to store them (no salt or slow hash
is needed for keys nobody chose). Only the hash is ever written to a file; the key itself is shown
once, by `concilium keys create`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from concilium.policy.keys import KeyEntry, KeysSection, Limits, parse_keys
from concilium.policy.loader import load_key_file

KEY_PREFIX = "ck-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (or None)."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


@dataclass(frozen=True)
class Scope:
    """One thing that has limits: a key, a team, a model, or one model for one key."""

    kind: str  # key | team | model | key-model
    id: str
    limits: Limits

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass(frozen=True)
class Key:
    entry: KeyEntry
    scopes: tuple[Scope, ...]  # key and team scopes that have limits (model scopes are per request)
    model_scopes: dict[str, tuple[Scope, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def has_budget(self) -> bool:
        return any(s.limits.budget is not None for s in self.scopes) or any(
            s.limits.budget is not None for ss in self.model_scopes.values() for s in ss)


class KeyTable:
    """Hash -> Key for one policy version (plus the key file)."""

    def __init__(self, section: KeysSection) -> None:
        teams = {t.team: t for t in section.teams}
        global_models = {m.model: Scope("model", m.model, m) for m in section.models if not m.empty}
        self.teams = teams
        self.section = section
        self._by_hash: dict[str, Key] = {}
        for e in section.keys:
            scopes = []
            if not e.empty:
                scopes.append(Scope("key", e.name, e))
            if e.team and e.team in teams and not teams[e.team].empty:
                scopes.append(Scope("team", e.team, teams[e.team]))
            per_model: dict[str, list[Scope]] = {m: [s] for m, s in global_models.items()}
            for m, lim in e.model_limits.items():
                if not lim.empty:
                    per_model.setdefault(m, []).append(Scope("key-model", f"{e.name}/{m}", lim))
            self._by_hash[e.hash] = Key(e, tuple(scopes), {m: tuple(s) for m, s in per_model.items()})

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, token: str) -> Key | None:
        key = self._by_hash.get(hash_key(token))
        if key is None:
            return None
        # the dict lookup already matched; compare again in constant time for good measure
        return key if hmac.compare_digest(key.entry.hash, hash_key(token)) else None

    def keys(self) -> list[Key]:
        return list(self._by_hash.values())


def merge(policy_keys: KeysSection, file_keys: KeysSection | None, file: str) -> KeysSection:
    """Policy keys plus key-file keys; a name or hash defined in both is an error."""
    if file_keys is None:
        return policy_keys
    entries = [e.model_dump(exclude_defaults=True) for e in policy_keys.keys + file_keys.keys]
    entries += [t.model_dump(exclude_defaults=True) for t in policy_keys.teams + file_keys.teams]
    entries += [m.model_dump(exclude_defaults=True) for m in policy_keys.models + file_keys.models]
    return parse_keys(entries, f"{file} (with the policy's keys)")




def read_key_file(path: Path) -> KeysSection | None:
    return load_key_file(path) if path.exists() else None
