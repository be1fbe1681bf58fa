"""The policy's `keys:` section (and key files, which hold the same list): who may call, with what caps.

`keys:` is a list. Each entry is one of:

- a key:   `{name, hash, team?, models?, routes?, budget?, rate?, model_limits?, default_max_tokens?, admin?}`
- a team:  `{team, budget?, rate?}`        shared caps for every key of that team
- a model: `{model, budget?, rate?}`       caps on one model across all keys

The list is read once, into a `KeysSection`; problems carry their key path (`keys[2].budget.usd_per_day`).
What the keys do (lookup, scopes, limits) is the guard's.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator

from concilium.policy.errors import Loc, PathError, PolicyError, format_loc, located_problems

HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    """Spend caps in USD; a window with no cap is not limited."""

    usd_per_day: float | None = Field(None, ge=0)
    usd_per_month: float | None = Field(None, ge=0)


class Rate(_Strict):
    requests_per_min: int | None = Field(None, gt=0)
    tokens_per_min: int | None = Field(None, gt=0)


class Limits(_Strict):
    budget: Budget | None = None
    rate: Rate | None = None

    @property
    def empty(self) -> bool:
        b, r = self.budget, self.rate
        return (b is None or (b.usd_per_day is None and b.usd_per_month is None)) and (
            r is None or (r.requests_per_min is None and r.tokens_per_min is None))


def _name(v: str, what: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(f"{what} {v!r} must be 1-128 characters of letters, digits and ._@/- "
                         "(starting with a letter or digit)")
    return v


class KeyEntry(Limits):
    name: str
    hash: str  # "sha256:<64 hex>" of the key; `concilium keys create` prints one
    team: str | None = None
    models: list[str] | None = None  # model names the key may ask for (policy or virtual); None = all
    routes: list[str] | None = None  # routes (or "pinned") the key may use; None = all
    model_limits: dict[str, Limits] = Field(default_factory=dict)  # caps on one model for this key
    default_max_tokens: int = Field(4096, gt=0)  # output bound used when a budgeted request sets none
    disabled: bool = False
    admin: StrictBool = False  # may read the console and /v1/admin (every key's spend, all traffic)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return _name(v, "key name")

    @field_validator("team")
    @classmethod
    def _check_team(cls, v: str | None) -> str | None:
        return v if v is None else _name(v, "team name")

    @field_validator("hash")
    @classmethod
    def _check_hash(cls, v: str) -> str:
        if not HASH_RE.match(v):
            raise ValueError("expected 'sha256:' and 64 lowercase hex digits (see `concilium keys create`); "
                             "never put the key itself in a file")
        return v


class TeamEntry(Limits):
    team: str

    @field_validator("team")
    @classmethod
    def _check_team(cls, v: str) -> str:
        return _name(v, "team name")


class ModelEntry(Limits):
    model: str


def _kind(entry: object) -> type[Limits] | str:
    if not isinstance(entry, dict):
        return f"expected a mapping, got {type(entry).__name__}"
    if "hash" in entry or "name" in entry:
        return KeyEntry
    if "team" in entry:
        return TeamEntry
    if "model" in entry:
        return ModelEntry
    return "each entry needs `name` and `hash` (a key), `team` (team caps) or `model` (model caps)"


class KeysSection(BaseModel):
    keys: list[KeyEntry] = Field(default_factory=list)
    teams: list[TeamEntry] = Field(default_factory=list)
    models: list[ModelEntry] = Field(default_factory=list)
    key_pos: list[int] = Field(default_factory=list)  # where each key / model entry stood in the list
    model_pos: list[int] = Field(default_factory=list)

    @classmethod
    def from_entries(cls, entries: object, section: str = "keys") -> KeysSection:
        """The section from its list; a PathError (paths relative to the list) with every problem."""
        if not isinstance(entries, list):
            raise PathError([((), f"expected a list, got {type(entries).__name__}")])
        problems: list[tuple[Loc, str]] = []
        out = cls()
        names: dict[str, int] = {}
        hashes: dict[str, int] = {}
        for i, raw in enumerate(entries):
            kind = _kind(raw)
            if isinstance(kind, str):
                problems.append(((i,), kind))
                continue
            try:
                item = kind.model_validate(raw)
            except ValidationError as e:
                problems += located_problems(e, (i,), doc="docs/keys.md")
                continue
            if isinstance(item, KeyEntry):
                if item.name in names:
                    problems.append(((i, "name"),
                                     f"duplicate key name {item.name!r} (also {section}[{names[item.name]}])"))
                if item.hash in hashes:
                    problems.append(((i, "hash"), f"the same key hash is also {section}[{hashes[item.hash]}]"))
                names.setdefault(item.name, i)
                hashes.setdefault(item.hash, i)
                out.keys.append(item)
                out.key_pos.append(i)
            elif isinstance(item, TeamEntry):
                out.teams.append(item)
            else:
                out.models.append(item)
                out.model_pos.append(i)
        if problems:
            raise PathError(problems)
        return out

    def reference_problems(self, model_names: set[str], route_names: set[str]) -> list[tuple[Loc, str]]:
        """Keys may only name models and routes that exist (virtual models count as models)."""
        problems: list[tuple[Loc, str]] = []
        for k, i in zip(self.keys, self.key_pos, strict=True):
            for j, m in enumerate(k.models or []):
                if m not in model_names:
                    problems.append((("keys", i, "models", j), f"unknown model {m!r}"))
            for j, r in enumerate(k.routes or []):
                if r not in route_names and r != "pinned":
                    problems.append((("keys", i, "routes", j), f"unknown route {r!r}"))
            for m in k.model_limits:
                if m not in model_names:
                    problems.append((("keys", i, "model_limits", m), f"unknown model {m!r}"))
        for m, i in zip(self.models, self.model_pos, strict=True):
            if m.model not in model_names:
                problems.append((("keys", i, "model"), f"unknown model {m.model!r}"))
        return problems


def parse_keys(entries: object, file: str, section: str = "keys") -> KeysSection:
    """A `keys:` list from outside a policy (a key file, the command line); PolicyError with every
    problem and its key path."""
    try:
        return KeysSection.from_entries(entries, section)
    except PathError as e:
        raise PolicyError(file, [(format_loc((section, *loc)), msg) for loc, msg in e.problems]) from None
