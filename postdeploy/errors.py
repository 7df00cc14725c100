"""One exception tree; each message is a single line a user can act on."""


class PostdeployError(Exception):
    """Base of every error postdeploy raises on purpose."""


class ConfigError(PostdeployError):
    """A setting, flag or postdeploy.yaml value is wrong; start-up stops."""


class AppSpecError(PostdeployError):
    """appspec.yaml at a commit is unreadable or malformed; the run ends as `error`."""


class GitError(PostdeployError):
    """A git operation failed; the message never holds URL credentials."""


class UnknownApp(PostdeployError):
    """An app name that no configuration declares."""


class RedisUnavailable(PostdeployError):
    """Redis cannot be reached at the configured address."""


class JobFailed(PostdeployError):
    """Raised by run_job so Celery and Flower show FAILURE with the reason."""


class JobUserError(PostdeployError):
    """The user an app's job must run as cannot be had on this host; the run ends as `error`."""
