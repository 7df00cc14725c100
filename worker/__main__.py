"""`python -m worker`: a prefork Celery worker running postdeploy's tasks."""

import sys

from postdeploy.service import run_worker

if __name__ == "__main__":
    run_worker(sys.argv[1:])
