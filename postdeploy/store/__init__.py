"""Everything postdeploy keeps in Redis, and its writer: keys, run records and their
moves, deployments, instances, decisions, verdicts, fencing, the Celery app.

Two writers stay outside on purpose, each with a client of its own: the webhook
service's delivery marks (webhook/state.py, every call bounded for its 503) and a
job guard's lease renewal (run/lease.py, in the guard's process after the fork).
"""
