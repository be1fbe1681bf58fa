"""Load and validate a policy file; errors name the file, the key path and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from concilium.policy.schema import Policy, _PathError


class PolicyError(Exception):
    """A policy file that cannot be used. `str()` is a readable, multi-line report."""

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems  # (key path, message)
        lines = [f"{file}: invalid policy"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


def format_loc(loc: tuple[str | int, ...]) -> str:
    """('routes', 2, 'fallbacks', 0) -> 'routes[2].fallbacks[0]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after[_references(), Policy]",))
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _PathError):
            problems.append((format_loc(ctx_err.loc), ctx_err.msg))
            continue
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see policies/default.yaml for the known keys)"
        elif e["type"] == "literal_error":
            msg = f"expected {e['ctx']['expected']}, got {e.get('input')!r}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append((format_loc(loc), msg))
    return problems


def parse_policy(text: str, file: str = "<string>") -> Policy:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(file, [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if not isinstance(data, dict):
        raise PolicyError(file, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        return Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(file, _problems(e)) from None


MAX_POLICY_BYTES = 1 << 20


def load_policy(path: str | os.PathLike[str]) -> Policy:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_POLICY_BYTES:
            raise PolicyError(str(p), [("", f"file is larger than {MAX_POLICY_BYTES} bytes")])
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(str(p), [("", "file not found")]) from None
    except UnicodeDecodeError as e:
        raise PolicyError(str(p), [("", f"not UTF-8 text: {e.reason} at byte {e.start}")]) from None
    return parse_policy(text, str(p))
