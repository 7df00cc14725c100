"""Telling the outside world how a run went: notifications (Apprise) and commit statuses,
each sent from its own task with a total deadline.
"""
