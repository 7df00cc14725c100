"""Entry point: `python -m worker` starts a postdeploy Celery worker."""
