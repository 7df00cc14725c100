"""postdeploy: run an application's POST_DEPLOY job once per deployed commit."""

__version__ = "0.1.0"
