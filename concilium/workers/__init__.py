"""Background jobs: long requests run on a Celery queue instead of holding an HTTP connection.

  celery_app.py   the Celery app and its one task (acks_late, reject_on_worker_lost)
  runner.py       one job's run: claim, call the model via specialists.call, publish events, end once
  store.py        the job store contract and its in-memory implementation (embedded mode)
  store_redis.py  the same contract on Redis (Lua scripts; a stream of events per job)
  responses.py    OpenAI Responses API shapes: request -> chat body, response object, events
  service.py      the gateway's side: submit, follow, wait, cancel
  runtime.py      where a job's coroutine runs (a worker process's loop, or the gateway's)
  embedded.py     the in-process worker thread pool on the in-memory broker
  config.py       deployment settings from CONCILIUM_JOBS_* variables
  cli.py          `concilium worker`
The HTTP routes are in concilium/gateway/routes_jobs.py; the policy's `jobs:` section in
concilium/policy/jobs.py; the behaviour users see in docs/jobs.md.
"""
