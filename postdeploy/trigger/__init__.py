"""Deciding that a run should happen: the commit check, each host's reports and placement,
manual runs.
"""
