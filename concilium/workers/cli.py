"""`concilium worker`: run a background-job worker (a Celery worker on CONCILIUM_REDIS_URL).

  concilium worker --policy policies/default.yaml                 # all queues, highest priority first
  concilium worker -Q high -c 2 -n high@%h                        # a worker that serves only `high`

Without CONCILIUM_REDIS_URL there is nothing to run: the gateway runs jobs itself (embedded mode).
"""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a background-job worker (needs CONCILIUM_REDIS_URL)")
    p.add_argument("--policy", default=None, help="policy YAML (default: $CONCILIUM_POLICY); the gateway's own")
    p.add_argument("-Q", "--queues", default=None,
                   help="comma-separated queues, highest priority first (default: the policy's jobs.queues)")
    p.add_argument("-c", "--concurrency", type=int, default=None, help="jobs at a time (default: CPU count)")
    p.add_argument("--pool", choices=["prefork", "threads", "solo"], default="prefork",
                   help="prefork (default) can kill a job at its hard timeout; threads and solo cannot")
    p.add_argument("-n", "--hostname", default=None, help="worker name, e.g. w1@%%h (unique per worker)")
    p.add_argument("--loglevel", default="info")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from concilium.policy.loader import PolicyError, load_policy
    from concilium.workers.config import process_settings

    if args.policy:
        os.environ["CONCILIUM_POLICY"] = args.policy  # the pool's processes read it too
    settings, _ = process_settings()  # after CONCILIUM_POLICY is set: the pool's processes inherit it
    if not settings.redis_url:
        print("concilium worker: CONCILIUM_REDIS_URL is not set. Workers take jobs from Redis; without it "
              "the gateway runs jobs itself (embedded mode) and no worker is needed.", file=sys.stderr)
        return 2
    try:
        cfg = load_policy(settings.policy).jobs
    except PolicyError as e:
        print(e, file=sys.stderr)
        return 2
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else cfg.queues
    unknown = [q for q in queues if q not in cfg.queues]
    if unknown or not queues:
        print(f"concilium worker: unknown queue(s) {unknown}; the policy's jobs.queues are {cfg.queues}",
              file=sys.stderr)
        return 2
    os.environ["CONCILIUM_JOBS_QUEUES"] = ",".join(queues)

    from celery.signals import worker_process_init, worker_ready

    from concilium.workers.celery_app import make_celery

    app = make_celery(settings.redis_url, queues)
    app.conf.worker_hijack_root_logger = True
    worker_process_init.connect(_warm_up, weak=False)
    if args.pool != "prefork":
        worker_ready.connect(_warm_up, weak=False)

    def announce(sender: object = None, **_: object) -> None:  # printed at any log level
        print(f"concilium worker {getattr(sender, 'hostname', '')} ready: queues {', '.join(queues)}", flush=True)

    worker_ready.connect(announce, weak=False)
    argv = ["worker", "-Q", ",".join(queues), "--pool", args.pool, "--loglevel", args.loglevel,
            "--without-gossip", "--without-mingle", "-O", "fair"]
    if args.concurrency:
        argv += ["-c", str(args.concurrency)]
    if args.hostname:
        argv += ["-n", args.hostname]
    app.worker_main(argv)
    return 0


def _warm_up(**_: object) -> None:
    """Build this process's runtime and start the policy's providers before the first job.

    In a pool process this runs in a thread of its own: loading a local model takes longer than
    Celery waits for a new pool process to report for work, and a process that does not report in
    time is killed and replaced, forever. The first job waits for the load instead (see
    `ProcessRuntime.snapshot`)."""
    import threading

    threading.Thread(target=_load_policy, name="concilium-warm-up", daemon=True).start()


def _load_policy() -> None:
    import logging

    from concilium.workers import runtime

    try:
        rt = runtime.current()
        rt.call(rt.snapshot())  # type: ignore[attr-defined]
    except Exception as e:
        logging.getLogger("concilium.workers").warning("worker warm-up failed: %s", e)
