"""The `checks` scorer: deterministic validity of a draft, with no model involved.

- `response_format`: when the request asks for `{"type": "json_object"}` the draft must be a JSON
  object; for `{"type": "json_schema", "json_schema": {"schema": ...}}` it must also validate
  against the schema;
- `tool_calls`: every tool call of the draft names a tool of the request, and its `arguments`
  parse as JSON and validate against that tool's `parameters` schema;
- `python`: every fenced code block labelled `python`/`py`/`python3` parses (`ast.parse`).

Checks that do not apply to a request are skipped; the score is 1.0 when every applicable check
passes (or none applies) and 0.0 otherwise. `run_checks` returns each check's verdict and reason.

The schema validator covers the JSON-schema subset that structured outputs and tool definitions
use: `type` (one or a list), `properties`, `required`, `additionalProperties` (bool or schema),
`items`, `enum`, `const`, `anyOf` / `oneOf` / `allOf`, `$ref` into `#/$defs` or `#/definitions`,
`minimum` / `maximum` / `exclusiveMinimum` / `exclusiveMaximum`, `minLength` / `maxLength`,
`minItems` / `maxItems`. Other keywords are ignored (accepted).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

from concilium.router.cascade.base import Draft, Scorer

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)
PYTHON_LABELS = ("python", "py", "python3")
_MAX_DEPTH = 64


class SchemaError(ValueError):
    """The instance does not match the schema; the message gives the JSON path."""


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise SchemaError(f"unsupported $ref {ref!r} (only local #/... references)")
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise SchemaError(f"$ref {ref!r} does not resolve")
        node = node[part]
    if not isinstance(node, dict):
        raise SchemaError(f"$ref {ref!r} is not a schema")
    return node


def validate(instance: Any, schema: Any, root: Any = None, path: str = "$", depth: int = 0) -> None:
    """Raise SchemaError (naming the path) unless `instance` matches `schema` (the subset above)."""
    if schema is True or schema is None:
        return
    if schema is False:
        raise SchemaError(f"{path}: no value is allowed here")
    if not isinstance(schema, dict):
        raise SchemaError(f"{path}: the schema is not an object")
    if depth > _MAX_DEPTH:
        raise SchemaError(f"{path}: schema nesting too deep")
    root = schema if root is None else root
    if "$ref" in schema:
        validate(instance, _resolve(schema["$ref"], root), root, path, depth + 1)
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        if not any(_TYPES.get(x, lambda v: True)(instance) for x in types):
            raise SchemaError(f"{path}: expected {' or '.join(map(str, types))}, got {type(instance).__name__}")
    if "enum" in schema and instance not in schema["enum"]:
        raise SchemaError(f"{path}: {instance!r} is not one of {schema['enum']!r}")
    if "const" in schema and instance != schema["const"]:
        raise SchemaError(f"{path}: expected {schema['const']!r}")
    for key in ("allOf", "anyOf", "oneOf"):
        subs = schema.get(key)
        if not isinstance(subs, list):
            continue
        ok = 0
        for sub in subs:
            try:
                validate(instance, sub, root, path, depth + 1)
                ok += 1
            except SchemaError:
                if key == "allOf":
                    raise
        if key == "anyOf" and not ok:
            raise SchemaError(f"{path}: matches none of anyOf")
        if key == "oneOf" and ok != 1:
            raise SchemaError(f"{path}: matches {ok} of oneOf (needs exactly one)")
    if isinstance(instance, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in instance:
                raise SchemaError(f"{path}: missing required property {name!r}")
        extra = schema.get("additionalProperties", True)
        for k, v in instance.items():
            if k in props:
                validate(v, props[k], root, f"{path}.{k}", depth + 1)
            elif extra is False:
                raise SchemaError(f"{path}: unexpected property {k!r}")
            elif isinstance(extra, dict):
                validate(v, extra, root, f"{path}.{k}", depth + 1)
    if isinstance(instance, list):
        items = schema.get("items")
        if isinstance(items, dict | bool):
            for i, v in enumerate(instance):
                validate(v, items, root, f"{path}[{i}]", depth + 1)
        if "minItems" in schema and len(instance) < schema["minItems"]:
            raise SchemaError(f"{path}: fewer than {schema['minItems']} items")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            raise SchemaError(f"{path}: more than {schema['maxItems']} items")
    if isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            raise SchemaError(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            raise SchemaError(f"{path}: longer than {schema['maxLength']} characters")
    if _TYPES["number"](instance):
        for key, bad in (("minimum", lambda v, b: v < b), ("maximum", lambda v, b: v > b),
                         ("exclusiveMinimum", lambda v, b: v <= b), ("exclusiveMaximum", lambda v, b: v >= b)):
            bound = schema.get(key)
            if isinstance(bound, int | float) and not isinstance(bound, bool) and bad(instance, bound):
                raise SchemaError(f"{path}: {instance} violates {key} {bound}")


def is_valid(instance: Any, schema: Any) -> bool:
    try:
        validate(instance, schema)
        return True
    except SchemaError:
        return False


@dataclass(frozen=True)
class CheckResult:
    check: str  # "response_format", "tool_calls", "python"
    ok: bool
    reason: str = ""


def _json_body(text: str) -> Any:
    s = text.strip()
    m = re.fullmatch(r"```(?:json)?\s*\n?(.*?)```", s, re.S)  # tolerate one fenced block
    if m:
        s = m.group(1).strip()
    return json.loads(s)


def check_response_format(answer: str, response_format: Any) -> CheckResult | None:
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind not in ("json_object", "json_schema"):
        return None
    try:
        value = _json_body(answer)
    except (json.JSONDecodeError, ValueError) as e:
        return CheckResult("response_format", False, f"not valid JSON ({e})")
    if kind == "json_object":
        return CheckResult("response_format", isinstance(value, dict), "" if isinstance(value, dict) else "not a JSON object")
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if schema is None:
        return CheckResult("response_format", True)
    try:
        validate(value, schema)
    except SchemaError as e:
        return CheckResult("response_format", False, str(e))
    return CheckResult("response_format", True)


def _tool_schemas(tools: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for t in tools if isinstance(tools, list) else []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters", True)
    return out


def tool_calls_of(completion: dict[str, Any] | None) -> list[dict[str, Any]]:
    try:
        calls = completion["choices"][0]["message"].get("tool_calls")  # type: ignore[index]
    except (KeyError, IndexError, TypeError, AttributeError):
        return []
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []


def check_tool_calls(completion: dict[str, Any] | None, tools: Any) -> CheckResult | None:
    calls = tool_calls_of(completion)
    if not calls:
        return None
    schemas = _tool_schemas(tools)
    for c in calls:
        fn = c.get("function") or {}
        name = fn.get("name")
        if name not in schemas:
            return CheckResult("tool_calls", False, f"unknown tool {name!r}")
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except (json.JSONDecodeError, TypeError) as e:
            return CheckResult("tool_calls", False, f"{name}: arguments are not valid JSON ({e})")
        try:
            validate(args, schemas[name])
        except SchemaError as e:
            return CheckResult("tool_calls", False, f"{name}: {e}")
    return CheckResult("tool_calls", True)


def check_python(answer: str) -> CheckResult | None:
    blocks = [body for label, body in _FENCE.findall(answer) if label.lower() in PYTHON_LABELS]
    if not blocks:
        return None
    for i, code in enumerate(blocks):
        try:
            ast.parse(code)
        except SyntaxError as e:
            return CheckResult("python", False, f"code block {i + 1}: line {e.lineno}: {e.msg}")
        except ValueError as e:  # null bytes
            return CheckResult("python", False, f"code block {i + 1}: {e}")
    return CheckResult("python", True)


CHECKS = ("response_format", "tool_calls", "python")


def run_checks(draft: Draft, which: tuple[str, ...] = CHECKS) -> list[CheckResult]:
    """The verdict of every applicable check, in `which` order."""
    req = draft.request or {}
    out: list[CheckResult | None] = []
    for name in which:
        if name == "response_format":
            out.append(check_response_format(draft.answer, req.get("response_format")))
        elif name == "tool_calls":
            out.append(check_tool_calls(draft.completion, req.get("tools")))
        elif name == "python":
            out.append(check_python(draft.answer))
        else:
            raise ValueError(f"unknown check {name!r}; known: {', '.join(CHECKS)}")
    return [r for r in out if r is not None]


class ChecksScorer(Scorer):
    name = "checks"

    def __init__(self, which: tuple[str, ...] | list[str] = CHECKS) -> None:
        unknown = [w for w in which if w not in CHECKS]
        if unknown:
            raise ValueError(f"unknown check {unknown[0]!r}; known: {', '.join(CHECKS)}")
        self.which = tuple(which)

    def score_draft(self, draft: Draft) -> float:
        return 1.0 if all(r.ok for r in run_checks(draft, self.which)) else 0.0

    def describe(self) -> dict[str, Any]:
        return {"scorer": self.name, "checks": list(self.which)}
