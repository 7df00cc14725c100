"""`python -m beat`: Celery beat firing postdeploy.check_commits every interval."""

import sys

from postdeploy.service import run_beat

if __name__ == "__main__":
    run_beat(sys.argv[1:])
