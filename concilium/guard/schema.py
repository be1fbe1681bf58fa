"""The policy's `keys:` and `privacy:` sections (and key files), validated with pydantic.

`keys:` is a list. Each entry is one of:

- a key:   `{name, hash, team?, models?, routes?, budget?, rate?, model_limits?, default_max_tokens?}`
- a team:  `{team, budget?, rate?}`        shared caps for every key of that team
- a model: `{model, budget?, rate?}`       caps on one model across all keys

Errors are raised as `PolicyError` naming the file and the key path (`keys[2].budget.usd_per_day`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from concilium.policy.loader import PolicyError, format_loc, read_text_file
from concilium.policy.loader import _safe_yaml as safe_yaml
from concilium.policy.schema import Policy

HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@/-]{0,127}$")
DETECTORS = ("email", "phone", "card", "iban", "api_key")


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


class OnPII(_Strict):
    """Where a prompt that contains PII may go: models with one of these tags or provider kinds."""

    allow_tags: list[str] = Field(default_factory=list)
    allow_providers: list[Literal["local", "openai", "litellm"]] = Field(default_factory=list)


class Privacy(_Strict):
    detect: list[Literal["email", "phone", "card", "iban", "api_key"]] = Field(
        default_factory=lambda: list(DETECTORS))
    on_pii: OnPII | None = None  # unset: PII only matters to routes that match on `pii`
    log_prompts: bool = False  # log each prompt (redacted when redact_logs) at INFO
    redact_logs: bool = True  # scrub PII and secrets from every log line


class KeysSection(BaseModel):
    keys: list[KeyEntry] = Field(default_factory=list)
    teams: list[TeamEntry] = Field(default_factory=list)
    models: list[ModelEntry] = Field(default_factory=list)
    key_pos: list[int] = Field(default_factory=list)  # where each key / model entry stood in the list
    model_pos: list[int] = Field(default_factory=list)


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


def _problems(err: ValidationError, prefix: tuple[str | int, ...]) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/keys.md for the known keys)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append((format_loc(prefix + tuple(e["loc"])), msg))
    return out


def parse_keys(entries: list, file: str, section: str = "keys") -> KeysSection:
    """Validate a `keys:` list; raise PolicyError with every problem and its key path."""
    problems: list[tuple[str, str]] = []
    out = KeysSection()
    if not isinstance(entries, list):
        raise PolicyError(file, [(section, f"expected a list, got {type(entries).__name__}")])
    names: dict[str, int] = {}
    hashes: dict[str, int] = {}
    for i, raw in enumerate(entries):
        kind = _kind(raw)
        if isinstance(kind, str):
            problems.append((format_loc((section, i)), kind))
            continue
        try:
            item = kind.model_validate(raw)
        except ValidationError as e:
            problems += _problems(e, (section, i))
            continue
        if isinstance(item, KeyEntry):
            if item.name in names:
                problems.append((format_loc((section, i, "name")),
                                 f"duplicate key name {item.name!r} (also {section}[{names[item.name]}])"))
            if item.hash in hashes:
                problems.append((format_loc((section, i, "hash")),
                                 f"the same key hash is also {section}[{hashes[item.hash]}]"))
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
        raise PolicyError(file, problems)
    return out


def parse_privacy(section: dict, file: str) -> Privacy:
    try:
        return Privacy.model_validate(section or {})
    except ValidationError as e:
        raise PolicyError(file, _problems(e, ("privacy",))) from None


def check_references(keys: KeysSection, model_names: set[str], route_names: set[str], file: str) -> None:
    """Keys may only name models and routes that exist (virtual models count as models)."""
    problems = []
    for k, i in zip(keys.keys, keys.key_pos, strict=True):
        for j, m in enumerate(k.models or []):
            if m not in model_names:
                problems.append((f"keys[{i}].models[{j}]", f"unknown model {m!r}"))
        for j, r in enumerate(k.routes or []):
            if r not in route_names and r != "pinned":
                problems.append((f"keys[{i}].routes[{j}]", f"unknown route {r!r}"))
        for m in k.model_limits:
            if m not in model_names:
                problems.append((f"keys[{i}].model_limits.{m}", f"unknown model {m!r}"))
    for m, i in zip(keys.models, keys.model_pos, strict=True):
        if m.model not in model_names:
            problems.append((f"keys[{i}].model", f"unknown model {m.model!r}"))
    if problems:
        raise PolicyError(file, problems)


def load_key_file(path: str | Path) -> KeysSection:
    """A key file is YAML with one top-level `keys:` list, in the same format as the policy's."""
    p = Path(path)
    text = read_text_file(p)
    try:
        data = safe_yaml(text) if text.strip() else {}
    except ValueError as e:
        raise PolicyError(str(p), [("", str(e))]) from None
    except RecursionError:
        raise PolicyError(str(p), [("", "YAML nested too deeply")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(str(p), [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or set(data) - {"keys"}:
        raise PolicyError(str(p), [("", "expected a mapping with one key, `keys:` (a list of keys)")])
    return parse_keys(data.get("keys") or [], str(p))


def check_policy(policy: Policy, file: str) -> None:
    """Validate a loaded policy's `keys:` and `privacy:` sections (called by the policy loader)."""
    keys = parse_keys(policy.keys, file)
    parse_privacy(policy.privacy, file)
    models = set(policy.models) | set(policy.router.virtual_models)
    check_references(keys, models, {r.name for r in policy.routes}, file)
