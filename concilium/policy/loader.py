"""Load and validate a policy file; errors name the file, the key path and what was expected."""

from __future__ import annotations

import importlib
import importlib.util
import os
import reprlib
from pathlib import Path

import yaml
from pydantic import ValidationError

from concilium.policy.local_models import local_model_problem
from concilium.policy.schema import ModelSpec, Policy, Route, RouterConfig, _PathError, reference_problems


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


def _problems(err: ValidationError, at: tuple[str | int, ...] = ()) -> list[tuple[str, str]]:
    problems = []
    for e in err.errors():
        loc = at + tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _PathError):
            problems += [(format_loc(loc + sub), msg) for sub, msg in ctx_err.problems]
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


def _duplicate_keys(node: yaml.Node, loc: tuple[str | int, ...], seen: set[int],
                    out: list[tuple[str, str]]) -> None:
    """Every mapping key given twice (YAML would keep the last value silently)."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _duplicate_keys(child, (*loc, i), seen, out)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            line = key.start_mark.line + 1
            if (key.tag, key.value) in first_line:
                first = first_line[key.tag, key.value]
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                out.append((format_loc((*loc, key.value)),
                            f"key given twice ({where}); YAML would silently keep only the last value"))
            else:
                first_line[key.tag, key.value] = line
            _duplicate_keys(value, (*loc, key.value), seen, out)


def _yaml_document(text: str) -> tuple[object, list[tuple[str, str]]]:
    """The document and its duplicate keys; ValueError when aliases expand it past MAX_YAML_NODES."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise ValueError(f"YAML aliases expand to more than {MAX_YAML_NODES} values")
        duplicates: list[tuple[str, str]] = []
        _duplicate_keys(node, (), set(), duplicates)
        return loader.construct_document(node), duplicates
    finally:
        loader.dispose()


def _safe_yaml(text: str) -> object:
    data, duplicates = _yaml_document(text)
    if duplicates:
        raise ValueError("; ".join(f"{path}: {msg}" for path, msg in duplicates))
    return data


def _section_problems(policy: Policy, file: str) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for target in SECTION_CHECKS:
        module, _, func = target.partition(":")
        if importlib.util.find_spec(module) is not None:
            try:
                getattr(importlib.import_module(module), func)(policy, file)
            except PolicyError as e:
                problems += e.problems
    return problems


def _file_problems(policy: Policy) -> list[tuple[str, str]]:
    """Checks against this machine: local model weights that are not where the policy says."""
    problems = []
    for name, spec in policy.models.items():
        if spec is not None and spec.provider == "local" and (why := local_model_problem(spec.model)):
            problems.append((format_loc(("models", name, "model")), why))
    return problems


def _salvage(data: dict) -> tuple[Policy, frozenset[int]]:
    """The valid parts of a policy that failed validation, so the checks that build on them still
    run (placeholders where a part is invalid) and one run reports every problem."""

    def valid(model: type, value: object, default: object) -> object:
        try:
            return model.model_validate(value)
        except ValidationError:
            return default

    raw_models = data.get("models") if isinstance(data.get("models"), dict) else {}
    models = {name: valid(ModelSpec, spec, None) for name, spec in raw_models.items()}
    raw_routes = data.get("routes") if isinstance(data.get("routes"), list) else []
    routes, skip = [], set()
    for i, raw in enumerate(raw_routes):
        route = valid(Route, raw, None)
        if route is None:
            skip.add(i)
            raw = raw if isinstance(raw, dict) else {}
            names = {k: v if isinstance(v, list) and all(isinstance(x, str) for x in v) else []
                     for k, v in raw.items() if k in ("targets", "fallbacks")}
            name = raw.get("name") if isinstance(raw.get("name"), str) else f"<routes[{i}]>"
            route = Route.model_construct(name=name, **{"targets": [], **names})
        routes.append(route)
    raw_router = data.get("router") if isinstance(data.get("router"), dict) else {}
    router = valid(RouterConfig, raw_router, None) or valid(
        RouterConfig, {"virtual_models": raw_router.get("virtual_models", ["concilium/auto"])}, RouterConfig())
    sections = {k: data[k] for k, kind in (("jobs", dict), ("keys", list), ("privacy", dict))
                if isinstance(data.get(k), kind)}
    return Policy.model_construct(models=models, routes=routes, router=router, **sections), frozenset(skip)


def parse_policy(text: str, file: str = "<string>") -> Policy:
    """A validated Policy, or a PolicyError listing every problem found (not only the first)."""
    try:
        data, problems = _yaml_document(text)
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
        problems += _problems(e)
        policy, skip = _salvage(data)
        problems += [(format_loc(loc), msg) for loc, msg in reference_problems(policy, skip)]
    problems += _file_problems(policy)
    problems += _section_problems(policy, file)
    if problems:
        raise PolicyError(file, list(dict.fromkeys(problems)))  # in file order of the checks, once each
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
    except IsADirectoryError:
        raise PolicyError(str(p), [("", "is a directory; expected a policy YAML file (to check every policy "
                                        f"in it: concilium policy check {p}/*.yaml)")]) from None
    except OSError as e:
        raise PolicyError(str(p), [("", f"cannot be read: {e.strerror or e}")]) from None
    except UnicodeDecodeError as e:
        raise PolicyError(str(p), [("", f"not UTF-8 text: {e.reason} at byte {e.start}")]) from None


def load_policy(path: str | os.PathLike[str]) -> Policy:
    return parse_policy(read_text_file(path), str(path))
