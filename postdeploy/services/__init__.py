"""The long-running processes: Celery tasks, worker and beat start-up, `up`, its supervisor
and embedded Redis, Flower, the metrics endpoint.
"""
