"""`python -m worker`: `postdeploy worker`, a prefork Celery worker running postdeploy's tasks."""

import sys

from postdeploy.cli import main

if __name__ == "__main__":
    main(["worker", *sys.argv[1:]])
