"""The push trigger: an HTTP service that verifies signed pushes and queues the matching
apps' checks.
"""
