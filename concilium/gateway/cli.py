"""`concilium serve`: run the gateway under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible gateway")
    p.add_argument("--policy", default=None, help="policy YAML (default: $CONCILIUM_POLICY or policies/default.yaml)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--log-level", default=None)
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    import uvicorn

    from concilium.gateway.app import create_app
    from concilium.policy.loader import PolicyError, load_policy
    from concilium.settings import Settings

    settings = Settings()
    policy = args.policy or settings.policy
    try:
        load_policy(policy)  # fail fast with the file and key path
    except PolicyError as e:
        print(e)
        return 2
    host = args.host or settings.host
    port = args.port or settings.port
    level = (args.log_level or settings.log_level).lower()
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, policy)
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", log_level=level,
                access_log=False, timeout_graceful_shutdown=30)
    return 0
