"""A policy (or key file) that cannot be used: the one place that turns YAML and pydantic errors into
`PolicyError`, each problem with its key path (`routes[2].fallbacks[0]`) and what was expected."""

from __future__ import annotations

import reprlib

import yaml
from pydantic import ValidationError

Loc = tuple[str | int, ...]

# Where the known keys of a section are written down, for "unknown key" messages.
_KEYS_DOC = {"keys": "docs/keys.md", "privacy": "docs/keys.md", "jobs": "docs/jobs.md", "cache": "docs/apis.md"}


class PolicyError(Exception):
    """A policy file that cannot be used. `str()` is a readable, multi-line report."""

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems  # (key path, message)
        lines = [f"{file}: invalid policy"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class PathError(ValueError):
    """Problems raised inside a validator that know where they are, relative to the object being
    validated: [(loc, message)]."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


def format_loc(loc: Loc) -> str:
    """('routes', 2, 'fallbacks', 0) -> 'routes[2].fallbacks[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def located_problems(err: ValidationError, at: Loc = (), doc: str | None = None) -> list[tuple[Loc, str]]:
    """Every error of `err` as (loc, message), `at` prefixed; a `PathError` raised in a validator
    contributes its own problems at their own places. `doc`: where the known keys are written down
    (by default, found from the section the error is in)."""
    problems: list[tuple[Loc, str]] = []
    for e in err.errors():
        loc = at + tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, PathError):
            problems += [(loc + sub, msg) for sub, msg in ctx_err.problems]
            continue
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            where = doc or _KEYS_DOC.get(loc[0] if loc else "", "policies/default.yaml")
            msg = f"unknown key (check the spelling; see {where} for the known keys)"
        elif e["type"] == "literal_error":
            msg = f"expected {e['ctx']['expected']}, got {reprlib.repr(e.get('input'))}"
        else:
            msg = msg.removeprefix("Value error, ")
        problems.append((loc, msg))
    return problems


def validation_problems(err: ValidationError, at: Loc = ()) -> list[tuple[str, str]]:
    """`located_problems` with the key paths written out."""
    return [(format_loc(loc), msg) for loc, msg in located_problems(err, at)]


def yaml_error(file: str, e: Exception) -> PolicyError:
    """The PolicyError for a document that is not usable YAML (syntax, nesting, alias expansion)."""
    if isinstance(e, RecursionError):
        return PolicyError(file, [("", "YAML nested too deeply")])
    if isinstance(e, yaml.YAMLError):
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return PolicyError(file, [(where, f"not valid YAML: {getattr(e, 'problem', e)}")])
    return PolicyError(file, [("", str(e))])
