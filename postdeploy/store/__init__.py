"""Everything postdeploy keeps in Redis, and the only writer of it: keys, run records and
their moves, deployments, instances, the Celery app.
"""
