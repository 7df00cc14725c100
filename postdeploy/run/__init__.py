"""One run on one host: the job task's steps, the user and sandbox it runs in, its
environment, the readiness wait, the guard that fences it, cancel, output.
"""
