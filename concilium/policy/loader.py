"""Load and validate a policy file; errors name the file, the key path and what was expected."""

from __future__ import annotations

import importlib
import importlib.util
import os
import reprlib
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
            msg = f"expected {e['ctx']['expected']}, got {reprlib.repr(e.get('input'))}"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append((format_loc(loc), msg))
    return problems


MAX_YAML_NODES = 200_000  # after aliases are expanded: refuses "billion laughs" documents

# Sections that other parts of the gateway validate: "module:function(policy, file)" raising PolicyError.
SECTION_CHECKS = ["concilium.guard.schema:check_policy", "concilium.policy.jobs:check_policy"]


def _expanded_size(node: yaml.Node, seen: dict[int, int]) -> int:
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = 1  # a recursive alias counts once
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, seen) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, seen) + _expanded_size(v, seen) for k, v in node.value)
    seen[id(node)] = size
    return size


def _safe_yaml(text: str) -> object:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ValueError(f"YAML aliases expand to more than {MAX_YAML_NODES} values")
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()


def _check_sections(policy: Policy, file: str) -> None:
    for target in SECTION_CHECKS:
        module, _, func = target.partition(":")
        if importlib.util.find_spec(module) is not None:
            getattr(importlib.import_module(module), func)(policy, file)


def parse_policy(text: str, file: str = "<string>") -> Policy:
    try:
        data = _safe_yaml(text)
    except ValueError as e:
        raise PolicyError(file, [("", str(e))]) from None
    except RecursionError:
        raise PolicyError(file, [("", "YAML nested too deeply")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(file, [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if not isinstance(data, dict):
        raise PolicyError(file, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(file, _problems(e)) from None
    _check_sections(policy, file)
    return policy


MAX_POLICY_BYTES = 1 << 20


def read_text_file(path: str | os.PathLike[str]) -> str:
    """A policy-like file's text, refusing a missing, oversized or non-UTF-8 file with a PolicyError."""
    p = Path(path)
    try:
        if p.stat().st_size > MAX_POLICY_BYTES:
            raise PolicyError(str(p), [("", f"file is larger than {MAX_POLICY_BYTES} bytes")])
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(str(p), [("", "file not found")]) from None
    except UnicodeDecodeError as e:
        raise PolicyError(str(p), [("", f"not UTF-8 text: {e.reason} at byte {e.start}")]) from None


def load_policy(path: str | os.PathLike[str]) -> Policy:
    return parse_policy(read_text_file(path), str(path))
