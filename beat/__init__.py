"""Entry point: `python -m beat` starts the commit-check scheduler."""
