from __future__ import annotations

import json

import pytest
import torch

from concilium.kernels import configs

# Every op's table, and what each of its configurations must hold: name -> smallest power of two.
REQUIRED = {
    "router_topk": {"BLOCK_T": 1},
    "moe_align": {"CHUNK": 16, "SCAN_BLOCK": 1},
    "fused_moe": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "DOWN_BLOCK_N": 16},
    "rmsnorm": {"BLOCK_ROWS": 1},
    "rope_kv_write": {"BLOCK_HEADS": 1},
    "decode_attention": {"BLOCK_N": 16},
}
POW2_OPTIONAL = {"num_warps", "merge_num_warps"}


@pytest.mark.parametrize("op", sorted(REQUIRED))
def test_shipped_tables_are_valid(op):
    tables = configs.load_tables(op)
    assert any(t["device"] == "*" and t["dtype"] == "*" and not t["shape"] for t in tables), (
        "needs a catch-all table"
    )
    for table in tables:
        for cfg in table["bounds"].values():
            for name, minimum in REQUIRED[op].items():
                value = cfg.get(name, minimum if name == "DOWN_BLOCK_N" else None)
                assert isinstance(value, int) and value >= minimum and value & (value - 1) == 0, (
                    op,
                    name,
                    cfg,
                )
            for name in POW2_OPTIONAL & cfg.keys():
                assert cfg[name] & (cfg[name] - 1) == 0, (op, name, cfg)
            assert cfg.get("num_stages", 1) >= 1


def test_the_most_specific_table_wins():
    def table(device="*", dtype="*", shape=None, tag=""):
        return {
            "device": device,
            "dtype": dtype,
            "shape": shape or {},
            "bounds": {16: {"t": tag + "16"}, 256: {"t": tag + "256"}},
        }

    tables = [
        table(tag="any"),
        table(dtype="bfloat16", tag="bf16"),
        table(shape={"E": 128}, tag="e128"),
        table(dtype="bfloat16", shape={"E": 128}, tag="bf16e128"),
        table(device="NVIDIA H100 80GB HBM3", tag="h100"),
    ]

    def pick(device, dtype, size, shape):
        return configs.select("op", tables, device, dtype, size, shape)["t"]

    assert pick("cpu", "float16", 1, {}) == "any16"
    assert pick("cpu", "float16", 17, {}) == "any256"
    assert pick("cpu", "float16", 10_000, {}) == "any256"  # beyond the last bound: the last one
    assert pick("cpu", "bfloat16", 3, {"E": 8}) == "bf16" + "16"
    assert pick("cpu", "float16", 3, {"E": 128}) == "e128" + "16"
    assert pick("cpu", "bfloat16", 3, {"E": 128}) == "bf16e128" + "16"
    assert pick("NVIDIA H100 80GB HBM3", "bfloat16", 300, {"E": 128}) == "h100" + "256"
    with pytest.raises(configs.ConfigError, match="no configuration table"):
        configs.select("op", tables[1:2], "cpu", "float32", 1, {})


def test_lookup_uses_the_device_table():
    cfg = configs.lookup("fused_moe", torch.device("cpu"), torch.float16, 4, {"E": 8, "H": 64, "I": 32})
    assert cfg["BLOCK_M"] == 16 and cfg["num_stages"] == 1  # the interpreter's table
    cfg["BLOCK_M"] = 999  # callers get a copy
    assert (
        configs.lookup("fused_moe", torch.device("cpu"), torch.float16, 4, {"E": 8, "H": 64, "I": 32})[
            "BLOCK_M"
        ]
        == 16
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("not json", "not valid JSON"),
        ({"tables": []}, "non-empty 'tables'"),
        ({"tables": [{"dtype": "float33", "configs": {"1": {}}}]}, r"tables\[0\].dtype"),
        ({"tables": [{"configs": {"one": {}}}]}, r"tables\[0\].configs\['one'\]"),
        ({"tables": [{"shape": {"E": "x"}, "configs": {"1": {}}}]}, r"tables\[0\].shape"),
        ({"tables": [{"configs": {}}]}, r"tables\[0\].configs"),
    ],
)
def test_malformed_tables_name_file_and_place(tmp_path, doc, message):
    path = tmp_path / "broken.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(configs.ConfigError, match=message) as info:
        configs.load_tables("broken", path)
    assert str(path) in str(info.value)
    with pytest.raises(configs.ConfigError, match="no configuration table for op"):
        configs.load_tables("missing", tmp_path / "missing.json")
