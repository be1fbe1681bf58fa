"""`concilium keys create|list|disable|enable|rotate|revoke`: make API keys and keep their hashes in
the key file.

The key is printed once and never stored; the key file (default `$CONCILIUM_KEYS_FILE` or
`<data dir>/keys.yaml`) keeps its SHA-256 with the key's team, allowed models and routes, budgets and
rate limits. `disable`/`enable` switch a key off and on, `rotate` gives a key a new secret (the old
one stops working; name, limits and spend stay), `revoke` removes it. A running gateway picks up
changes to the key file within a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="API keys: create, list, disable, enable, rotate, revoke")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    c = ksub.add_parser("create", help="make a key, store its hash, print the key once")
    c.add_argument("--name", required=True, help="a name for the key (shown in /v1/usage and logs)")
    c.add_argument("--team", help="team whose shared caps also apply")
    c.add_argument("--models", help="comma-separated model names the key may ask for (default: all)")
    c.add_argument("--routes", help="comma-separated route names the key may use (default: all)")
    c.add_argument("--usd-per-day", type=float)
    c.add_argument("--usd-per-month", type=float)
    c.add_argument("--rpm", type=int, help="requests per minute")
    c.add_argument("--tpm", type=int, help="tokens per minute")
    c.add_argument("--admin", action="store_true", help="may open the console and /v1/admin/* (all keys' spend)")
    c.add_argument("--file", help="key file (default: $CONCILIUM_KEYS_FILE or <data dir>/keys.yaml)")
    c.add_argument("--print-only", action="store_true",
                   help="write nothing: print the key and the YAML entry to paste into a policy's keys:")
    c.set_defaults(func=create)
    ls = ksub.add_parser("list", help="list the keys in the key file (names and limits, never keys)")
    ls.add_argument("--file")
    ls.set_defaults(func=list_keys)
    for name, func, text in (
            ("disable", disable, "refuse a key (401) until it is enabled again"),
            ("enable", enable, "accept a disabled key again"),
            ("rotate", rotate, "give a key a new secret and print it once; the old one stops working"),
            ("revoke", revoke, "remove a key from the key file for good")):
        c = ksub.add_parser(name, help=text)
        c.add_argument("name", help="the key's name")
        c.add_argument("--file", help="key file (default: $CONCILIUM_KEYS_FILE or <data dir>/keys.yaml)")
        c.set_defaults(func=func)


def _key_file(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from concilium.settings import Settings

    return Path(Settings().key_file_path)


def _entry(args: argparse.Namespace, key_hash: str) -> dict:
    entry: dict = {"name": args.name, "hash": key_hash}
    if args.team:
        entry["team"] = args.team
    if args.models:
        entry["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.routes:
        entry["routes"] = [r.strip() for r in args.routes.split(",") if r.strip()]
    budget = {k: v for k, v in (("usd_per_day", args.usd_per_day), ("usd_per_month", args.usd_per_month))
              if v is not None}
    if budget:
        entry["budget"] = budget
    rate = {k: v for k, v in (("requests_per_min", args.rpm), ("tokens_per_min", args.tpm)) if v is not None}
    if rate:
        entry["rate"] = rate
    if getattr(args, "admin", False):
        entry["admin"] = True
    return entry


def _save(path: Path, entries: list) -> bool:
    """Write the key file's entries if they are a valid key section; else say why and write nothing."""
    from concilium.policy.keys import parse_keys
    from concilium.policy.loader import PolicyError

    try:
        parse_keys(entries, str(path))
    except PolicyError as e:
        print(e, file=sys.stderr)
        return False
    _write(path, entries)
    return True


def _write(path: Path, entries: list[dict]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# API keys (hashes only). Made by `concilium keys create`.\n"
    text += yaml.safe_dump({"keys": entries}, sort_keys=False)
    fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def create(args: argparse.Namespace) -> int:
    import yaml

    from concilium.guard.keys import hash_key, new_key
    from concilium.policy.keys import parse_keys
    from concilium.policy.loader import PolicyError, load_key_file

    key = new_key()
    entry = _entry(args, hash_key(key))
    try:
        parse_keys([entry], "<command line>")
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    if args.print_only:
        print(key)
        print("# add to the policy's keys: list")
        print(yaml.safe_dump([entry], sort_keys=False), end="")
        return 0
    path = _key_file(args.file)
    try:
        if path.exists():
            load_key_file(path)  # refuse to extend a broken file
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    entries = list((raw or {}).get("keys") or [])
    if any(isinstance(x, dict) and x.get("name") == args.name for x in entries):
        print(f"{path}: a key named {args.name!r} already exists", file=sys.stderr)
        return 2
    entries.append(entry)
    if not _save(path, entries):
        return 2
    print(key)
    print(f"# stored the hash of key {args.name!r} in {path}; the key itself is shown only now", file=sys.stderr)
    return 0


def list_keys(args: argparse.Namespace) -> int:
    from concilium.policy.loader import PolicyError, load_key_file

    path = _key_file(args.file)
    if not path.exists():
        print(f"{path}: no key file")
        return 0
    try:
        section = load_key_file(path)
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    for k in section.keys:
        limits = []
        if k.budget:
            limits += [f"${v}/{w}" for w, v in (("day", k.budget.usd_per_day), ("month", k.budget.usd_per_month))
                       if v is not None]
        if k.rate:
            limits += [f"{v} {w}/min" for w, v in (("req", k.rate.requests_per_min), ("tok", k.rate.tokens_per_min))
                       if v is not None]
        print(f"{k.name}\tteam={k.team or '-'}\t{' '.join(limits) or 'no limits'}"
              + ("\tdisabled" if k.disabled else ""))
    return 0


def _change(args: argparse.Namespace, edit) -> int:
    """Apply `edit(entries, index)` to the key named `args.name` in the key file, check, write."""
    import yaml

    from concilium.policy.loader import PolicyError, load_key_file

    path = _key_file(args.file)
    if not path.exists():
        print(f"{path}: no key file", file=sys.stderr)
        return 2
    try:
        load_key_file(path)  # refuse to edit a broken file
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    entries = list((yaml.safe_load(path.read_text()) or {}).get("keys") or [])
    where = [i for i, x in enumerate(entries) if isinstance(x, dict) and x.get("name") == args.name]
    if not where:
        print(f"{path}: no key named {args.name!r} (keys defined in a policy's keys: are changed there)",
              file=sys.stderr)
        return 2
    out = edit(entries, where[0])
    if not _save(path, entries):
        return 2
    if out:
        print(out)
    return 0


def _set_disabled(value: bool):
    def edit(entries: list[dict], i: int) -> None:
        if value:
            entries[i]["disabled"] = True
        else:
            entries[i].pop("disabled", None)
    return edit


def disable(args: argparse.Namespace) -> int:
    rc = _change(args, _set_disabled(True))
    if rc == 0:
        print(f"# key {args.name!r} is disabled", file=sys.stderr)
    return rc


def enable(args: argparse.Namespace) -> int:
    rc = _change(args, _set_disabled(False))
    if rc == 0:
        print(f"# key {args.name!r} is enabled", file=sys.stderr)
    return rc


def rotate(args: argparse.Namespace) -> int:
    from concilium.guard.keys import hash_key, new_key

    key = new_key()

    def edit(entries: list[dict], i: int) -> str:
        entries[i]["hash"] = hash_key(key)
        return key

    rc = _change(args, edit)
    if rc == 0:
        print(f"# key {args.name!r} has a new secret, shown only now; the old one no longer works",
              file=sys.stderr)
    return rc


def revoke(args: argparse.Namespace) -> int:
    def edit(entries: list[dict], i: int) -> None:
        del entries[i]

    rc = _change(args, edit)
    if rc == 0:
        print(f"# key {args.name!r} is revoked", file=sys.stderr)
    return rc
