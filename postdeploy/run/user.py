"""Who each app's job runs as, and why: the app's user.

Two apps' jobs never share a uid unless the operator says so, because a process may
read the environment of, and signal, any process of its own uid: one app's job could
otherwise read another's secrets or kill it. In order:

1. ``user:`` of the app in postdeploy.yaml (a name or ``uid:gid``);
2. for a ``path`` app, the owner of its working copy, when that is not root;
3. ``POSTDEPLOY_JOB_USER``, the operator's choice of one user for all other apps;
4. a uid of the app's own (DynamicUser-style, see :mod:`postdeploy.run.dynamic_uids`).

Never root. Where the executor is not root it cannot switch users: jobs run as the
executor's own user, which is then the app's user only if the operator made it so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from postdeploy.config.users import (
    JobUser,
    parse_uid_range,
    parse_user,
    passwd_user,
)
from postdeploy.errors import ConfigError, JobUserError
from postdeploy.run.dynamic_uids import dynamic_uid, peek_uid

if TYPE_CHECKING:
    from postdeploy.config.settings import AppConfig, Settings

@dataclass(frozen=True)
class AppUser:
    """The user an app's job runs as (None: the executor's own) and why."""

    user: JobUser | None
    why: str

    def describe(self) -> str:
        return f"{self.user.describe()}: {self.why}" if self.user else self.why


def app_user(settings: Settings, app: AppConfig, allocate: bool = True) -> AppUser:
    """Who ``app``'s job runs as on this host, and why (see the module's order).

    ``allocate``: give the app a dynamic uid when it has none yet (the worker does;
    a look from `validate` does not). Raises JobUserError when the user cannot be had.
    """
    if os.geteuid() != 0:
        own = passwd_user(os.geteuid(), os.getegid())
        return AppUser(None, f"the executor's own user, {own.describe()}: it is not root, "
                             "so it cannot switch users")
    try:
        if app.user:
            return AppUser(parse_user(app.user, f"app {app.name!r}: user"),
                           "user: in postdeploy.yaml")
        owner = path_owner(app)
        if owner is not None:
            return AppUser(owner, f"owner of {app.path}")
        if settings.job_user:
            return AppUser(parse_user(settings.job_user, "POSTDEPLOY_JOB_USER"),
                           "POSTDEPLOY_JOB_USER, shared by every app without a user of "
                           "its own")
    except ConfigError as exc:  # the passwd entry went away since start-up
        raise JobUserError(str(exc)) from None
    uid_range = parse_uid_range(settings.job_uids)
    taken = claimed_uids(settings, app)
    uid = (dynamic_uid(settings.state_dir, app.name, uid_range, taken) if allocate
           else peek_uid(settings.state_dir, app.name, uid_range, taken))
    if uid is None:
        return AppUser(None, f"a dynamic uid of its own from {uid_range[0]}-{uid_range[1]}, "
                             f"given to app {app.name} when a worker here starts")
    return AppUser(JobUser(uid, uid), f"dynamic uid {uid} for app {app.name}")


def path_owner(app: AppConfig) -> JobUser | None:
    """The owner of a ``path`` app's working copy, unless that is root."""
    if not app.path:
        return None
    try:
        info = Path(app.path).stat()
    except OSError:
        return None  # the run will say the working copy is missing
    if info.st_uid == 0:
        return None
    return passwd_user(info.st_uid, info.st_gid or info.st_uid)


def claimed_uids(settings: Settings, app: AppConfig) -> set[int]:
    """Uids other apps run as by name, owner or operator choice: no dynamic uid may be one."""
    taken: set[int] = set()
    for other in settings.apps:
        if other.name == app.name:
            continue
        try:
            if other.user:
                taken.add(parse_user(other.user, "user").uid)
            elif (owner := path_owner(other)) is not None:
                taken.add(owner.uid)
        except ConfigError:
            pass  # that app's own runs report it
    if settings.job_user:
        try:
            taken.add(parse_user(settings.job_user, "POSTDEPLOY_JOB_USER").uid)
        except ConfigError:
            pass
    return taken


def check_app_users(settings: Settings) -> None:
    """At a worker's start: every app's user exists here and can be switched to.

    Raises ConfigError naming the app and the fix.
    """
    parse_uid_range(settings.job_uids)
    for app in settings.apps:
        if not app.user:
            continue
        user = parse_user(app.user, f"app {app.name!r}: user")
        if os.geteuid() != 0 and user.uid != os.geteuid():
            raise ConfigError(f"app {app.name!r}: user {app.user!r} needs the worker to run "
                              "as root (to switch users); run it as root or as that user")
