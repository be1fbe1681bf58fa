"""A small, fast reader for the GGUF container: key/values and tensor descriptors parsed with
`struct`, tensor bytes memory-mapped. (The `gguf` package's reader builds a numpy view per string,
which takes seconds on a 50k-token vocabulary; its dequantisers are still used for the blocks.)

Format: magic "GGUF", version, tensor count, key/value count; the key/values; per tensor its name,
dimensions (innermost first), block type and offset; then, aligned, the tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}


class GGUFFormatError(ValueError):
    pass


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGML order: innermost dimension first
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # raw bytes [rows..., bytes per row] as uint8

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._mv = memoryview(self._buf)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, KeyError, IndexError) as e:
            raise GGUFFormatError(f"{self.path}: malformed GGUF ({e})") from None

    def _take(self, fmt: str) -> Any:
        (v,) = struct.unpack_from(fmt, self._mv, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._take("<Q")
        s = bytes(self._mv[self._pos : self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype, count = self._take("<I"), self._take("<Q")
            if itype in _NUMPY:  # numbers: one vectorised read
                dt = np.dtype(_NUMPY[itype]).newbyteorder("<")
                arr = np.frombuffer(self._mv, dtype=dt, count=count, offset=self._pos)
                self._pos += arr.nbytes
                return arr.tolist()
            return [self._value(itype) for _ in range(count)]
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")

    def _parse(self) -> None:
        if bytes(self._mv[:4]) != b"GGUF":
            raise GGUFFormatError(f"{self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        self.version = self._take("<I")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._take("<Q") for _ in range(self._take("<I")))
            infos.append((name, dims, GGMLQuantizationType(self._take("<I")), self._take("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ttype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[ttype]
            row_bytes = dims[0] // block * type_size
            rows = int(np.prod(dims[1:])) if len(dims) > 1 else 1
            begin = start + offset
            raw = self._buf[begin : begin + rows * row_bytes]
            shape = (*reversed(dims[1:]), row_bytes) if len(dims) > 1 else (row_bytes,)
            self.tensors[name] = GGUFTensor(name, dims, ttype, raw.reshape(shape))
