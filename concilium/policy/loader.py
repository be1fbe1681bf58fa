"""Load and validate a policy file; errors name the file, the key path and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from concilium.policy.errors import PathError, PolicyError, format_loc, validation_problems, yaml_error
from concilium.policy.jobs import JobsConfig
from concilium.policy.keys import KeysSection, parse_keys
from concilium.policy.local_models import local_model_problem
from concilium.policy.privacy import Privacy
from concilium.policy.schema import ModelSpec, Policy, Route, RouterConfig, reference_problems

__all__ = ["PolicyError", "format_loc", "load_key_file", "load_policy", "parse_policy", "read_text_file"]

MAX_YAML_NODES = 200_000  # after aliases are expanded: refuses "billion laughs" documents


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


def _file_problems(policy: Policy) -> list[tuple[str, str]]:
    """Checks against this machine: local model weights that are not where the policy says."""
    problems = []
    for name, spec in policy.models.items():
        if spec is not None and spec.provider == "local" and (why := local_model_problem(spec.model)):
            problems.append((format_loc(("models", name, "model")), why))
    return problems


def _salvage(data: dict) -> tuple[Policy, frozenset[int | str]]:
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
    routes, skip = [], set[int | str]()
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
    sections: dict[str, object] = {}
    for name, model in (("jobs", JobsConfig), ("privacy", Privacy)):
        sections[name] = valid(model, data.get(name) or {}, None)
    try:
        sections["keys"] = KeysSection.from_entries(data.get("keys") or [])
    except PathError:
        sections["keys"] = None
    skip |= {name for name, value in sections.items() if value is None}  # invalid: no checks build on it
    sections = {name: value for name, value in sections.items() if value is not None}
    return Policy.model_construct(models=models, routes=routes, router=router, **sections), frozenset(skip)


def parse_policy(text: str, file: str = "<string>") -> Policy:
    """A validated Policy, or a PolicyError listing every problem found (not only the first)."""
    try:
        data, problems = _yaml_document(text)
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        raise yaml_error(file, e) from None
    if not isinstance(data, dict):
        raise PolicyError(file, [("", f"expected a mapping at the top level, got {type(data).__name__}")])
    try:
        policy = Policy.model_validate(data)
    except ValidationError as e:
        problems += validation_problems(e)
        policy, skip = _salvage(data)
        problems += [(format_loc(loc), msg) for loc, msg in reference_problems(policy, skip)]
    problems += _file_problems(policy)
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


def load_key_file(path: str | os.PathLike[str]) -> KeysSection:
    """A key file is YAML with one top-level `keys:` list, in the same format as the policy's."""
    p = Path(path)
    text = read_text_file(p)
    try:
        data = _safe_yaml(text) if text.strip() else {}
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        raise yaml_error(str(p), e) from None
    if data is None:
        data = {}
    if not isinstance(data, dict) or set(data) - {"keys"}:
        raise PolicyError(str(p), [("", "expected a mapping with one key, `keys:` (a list of keys)")])
    return parse_keys(data.get("keys") or [], str(p))
