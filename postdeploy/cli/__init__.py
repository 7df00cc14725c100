"""The `postdeploy` command line: wires flags to Settings and to the library.

Every error is one line on stderr (`postdeploy: error: ...`) and a non-zero
exit; a traceback is a bug.
"""

from __future__ import annotations

import os
import sys

import click
import redis
from kombu.exceptions import OperationalError

# The command modules register their commands on the group when imported.
from postdeploy.cli import deploys, operate, services  # noqa: F401
from postdeploy.cli.group import EXIT_FAILED, EXIT_USAGE, cli, fail
from postdeploy.errors import ConfigError, PostdeployError


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the command, turn every error into one line."""
    args = sys.argv[1:] if argv is None else argv
    try:
        # A bare `postdeploy` shows the help, not a one-line usage error.
        result = cli.main(args=args or ["--help"], prog_name="postdeploy",
                          standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Abort:
        code = fail("interrupted", 130)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        code = fail(exc.format_message().rstrip(".") + hint, EXIT_USAGE)
    except click.ClickException as exc:
        code = fail(exc.format_message(), exc.exit_code or EXIT_FAILED)
    except ConfigError as exc:
        code = fail(str(exc), EXIT_USAGE)
    except PostdeployError as exc:
        code = fail(str(exc), EXIT_FAILED)
    except (redis.RedisError, OperationalError) as exc:
        code = fail(f"Redis error: {exc}; is Redis (or `postdeploy up`) running?", EXIT_FAILED)
    except KeyboardInterrupt:
        code = fail("interrupted", 130)
    except BrokenPipeError:
        # Output piped into `head` and the like: the reader left, nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_FAILED
    except Exception as exc:  # a bug: still one line, with what to report
        code = fail(f"unexpected {type(exc).__name__}: {exc}; please report this", EXIT_FAILED)
    sys.exit(code)
