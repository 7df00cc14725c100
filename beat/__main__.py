"""`python -m beat`: `postdeploy beat`, Celery beat sending postdeploy.check_commits."""

import sys

from postdeploy.cli import main

if __name__ == "__main__":
    main(["beat", *sys.argv[1:]])
