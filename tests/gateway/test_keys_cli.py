"""`concilium keys create|list|disable|enable|rotate|revoke` against a key file."""

from __future__ import annotations

import pytest

from concilium.cli import main
from concilium.guard.keys import KeyTable
from concilium.policy.loader import load_key_file


def table(path) -> KeyTable:
    return KeyTable(load_key_file(path))


def create(path, name, capsys) -> str:
    assert main(["keys", "create", "--name", name, "--file", str(path)]) == 0
    return capsys.readouterr().out.strip()


def test_disable_enable_rotate_revoke(tmp_path, capsys):
    path = tmp_path / "keys.yaml"
    alice, bob = create(path, "alice", capsys), create(path, "bob", capsys)

    assert main(["keys", "disable", "alice", "--file", str(path)]) == 0
    assert table(path).lookup(alice).entry.disabled
    assert not table(path).lookup(bob).entry.disabled
    capsys.readouterr()
    assert main(["keys", "list", "--file", str(path)]) == 0
    assert "disabled" in next(line for line in capsys.readouterr().out.splitlines() if line.startswith("alice"))
    assert main(["keys", "enable", "alice", "--file", str(path)]) == 0
    assert not table(path).lookup(alice).entry.disabled

    assert main(["keys", "rotate", "alice", "--file", str(path)]) == 0
    new = capsys.readouterr().out.strip()
    assert new.startswith("ck-") and new != alice and new not in path.read_text()
    assert table(path).lookup(alice) is None  # the old key stops working
    assert table(path).lookup(new).name == "alice"

    assert main(["keys", "revoke", "alice", "--file", str(path)]) == 0
    assert table(path).lookup(new) is None
    assert [k.name for k in table(path).keys()] == ["bob"]


@pytest.mark.parametrize("command", ["disable", "enable", "rotate", "revoke"])
def test_unknown_key_name_is_an_error(tmp_path, capsys, command):
    path = tmp_path / "keys.yaml"
    create(path, "bob", capsys)
    before = path.read_text()
    assert main(["keys", command, "carol", "--file", str(path)]) == 2
    assert "no key named 'carol'" in capsys.readouterr().err
    assert path.read_text() == before
