"""Block configurations from JSON tables keyed by device, dtype and shape.

Triton's multi-config autotuning cannot run in the interpreter, and tuning at start-up costs
minutes on a GPU; instead each op reads `configs/<op>.json`:

    {"op": "fused_moe", "size": "tokens",
     "tables": [{"device": "*", "dtype": "*", "shape": {},
                 "configs": {"16": {"BLOCK_M": 16, ...}, "256": {...}}}, ...]}

A table applies when its device (as `torch.cuda.get_device_name`, or "cpu" for the interpreter),
dtype and every listed shape field match, "*" matching anything; the most specific applicable
table wins (device counts most, then dtype, then each shape field). Inside it, `configs` maps an
upper bound on the op's size (e.g. the number of tokens) to a configuration: the smallest bound
at or above the size is used, the largest bound beyond the last one. Tables measured on a GPU
are added by `python benchmarks/kernels.py --tune`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
Config = dict[str, Any]


class ConfigError(ValueError):
    """A malformed configuration table."""


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def load_tables(op: str, path: Path | None = None) -> tuple[dict[str, Any], ...]:
    """The validated tables of one op (cached)."""
    path = path or CONFIG_DIR / f"{op}.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no configuration table for op {op!r}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), list) or not doc["tables"]:
        raise ConfigError(f"{path}: expected an object with a non-empty 'tables' list")
    return tuple(_validated(path, i, t) for i, t in enumerate(doc["tables"]))


def _validated(path: Path, i: int, table: Any) -> dict[str, Any]:
    where = f"{path}: tables[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected an object")
    for key in ("device", "dtype"):
        if not isinstance(table.get(key, "*"), str):
            raise ConfigError(f"{where}.{key}: expected a string")
    dtype = table.get("dtype", "*")
    if dtype != "*" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"{where}.dtype: {dtype!r} is not a torch dtype")
    shape = table.get("shape", {})
    if not isinstance(shape, dict) or not all(isinstance(v, int) for v in shape.values()):
        raise ConfigError(f"{where}.shape: expected an object of integers")
    configs = table.get("configs")
    if not isinstance(configs, dict) or not configs:
        raise ConfigError(f"{where}.configs: expected a non-empty object")
    bounds: dict[int, Config] = {}
    for key, cfg in configs.items():
        if not key.isdigit() or not isinstance(cfg, dict):
            raise ConfigError(f"{where}.configs[{key!r}]: expected an integer key and an object")
        bounds[int(key)] = dict(cfg)
    return {
        "device": table.get("device", "*"),
        "dtype": dtype,
        "shape": dict(shape),
        "bounds": dict(sorted(bounds.items())),
    }


def _score(table: Mapping[str, Any], device: str, dtype: str, shape: Mapping[str, int]) -> int:
    """How specifically `table` matches, or -1 when it does not apply."""
    score = 0
    if table["device"] != "*":
        if table["device"] != device:
            return -1
        score += 100
    if table["dtype"] != "*":
        if table["dtype"] != dtype:
            return -1
        score += 10
    for key, value in table["shape"].items():
        if shape.get(key) != value:
            return -1
        score += 1
    return score


def lookup(
    op: str, device: torch.device, dtype: torch.dtype, size: int, shape: Mapping[str, int] | None = None
) -> Config:
    """The block configuration of `op` for this device, dtype, shape and size (a fresh dict)."""
    return dict(
        _lookup(op, device_name(device), dtype_name(dtype), size, tuple(sorted((shape or {}).items())))
    )


@functools.lru_cache(maxsize=4096)
def _lookup(op: str, device: str, dtype: str, size: int, shape: tuple[tuple[str, int], ...]) -> Config:
    return select(op, load_tables(op), device, dtype, size, dict(shape))


def select(
    op: str, tables: Sequence[Mapping[str, Any]], device: str, dtype: str, size: int, shape: Mapping[str, int]
) -> Config:
    """The configuration for `size` in the most specific applicable table (first of equals)."""
    best, best_score = None, -1
    for table in tables:
        score = _score(table, device, dtype, shape)
        if score > best_score:
            best, best_score = table, score
    if best is None:
        raise ConfigError(f"{op}: no configuration table applies to {device} / {dtype} / {dict(shape)}")
    bounds = best["bounds"]
    for bound, cfg in bounds.items():
        if size <= bound:
            return cfg
    return bounds[max(bounds)]
