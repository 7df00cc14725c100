"""`python -m postdeploy.cli`: the `postdeploy` command."""

from postdeploy.cli import main

main()
