"""`concilium policy check FILE`: validate a policy without starting anything."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="policy tools")
    psub = p.add_subparsers(dest="policy_command", required=True)
    c = psub.add_parser("check", help="validate policy files and print a summary")
    c.add_argument("files", nargs="+")
    c.set_defaults(func=check)


def check(args: argparse.Namespace) -> int:
    from concilium.pipeline.cascade import check_strategies  # an entry point: it may look at every layer
    from concilium.policy.loader import PolicyError, load_policy

    rc = 0
    for f in args.files:
        try:
            pol = load_policy(f)
            check_strategies(pol, f)
        except PolicyError as e:
            print(e)
            rc = 1
            continue
        print(f"{f}: ok ({len(pol.models)} models, {len(pol.routes)} routes; "
              f"virtual models: {', '.join(pol.router.virtual_models)})")
    return rc
