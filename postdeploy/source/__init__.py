"""What an app's repository says: git (clone, fetch, checkout, safety), the appspec, the
readiness gate's URL and probe, and `validate`.
"""
