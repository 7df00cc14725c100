"""Where and as whom a job runs: its app's user, and the job's mount namespace.

A job is the app author's code; the executor is the operator's. When the executor
runs as root, each job runs as its app's user (see :mod:`postdeploy.run.user`: never
root, never another app's uid unless the operator says so), so the executor's files
(mode 0600/0700: the Redis address, the embedded Redis data, postdeploy.yaml) and
processes, and other apps' jobs (``/proc/PID/environ``, signals), are out of its
reach. Where the kernel allows it (root with CAP_SYS_ADMIN), the job also gets a
mount namespace of its own in which the state directory and every other app's
working copy are covered by an empty tmpfs; only its own checkout and its home
directory are mounted back. Where the executor cannot switch users, it says so
once at start-up: jobs then run with the executor's reach.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from postdeploy.config.users import JobUser, parse_user, passwd_user
from postdeploy.errors import ConfigError, JobUserError
from postdeploy.run.user import app_user

if TYPE_CHECKING:
    from postdeploy.config.settings import Settings

@dataclass(frozen=True)
class Sandbox:
    """Who the job runs as and what it may see (empty: as the worker, seeing everything)."""

    uid: int | None = None
    gid: int | None = None
    hide: tuple[str, ...] = ()  # paths covered by an empty tmpfs (directories) or /dev/null
    root: str | None = None  # an empty tmpfs is mounted here for the binds below
    binds: tuple[tuple[str, str], ...] = ()  # (source, where the job sees it), under root


JOB_ROOT = Path("/run/postdeploy-jobs")  # where a sandboxed job sees its checkout and home
HOMES_DIR = "homes"  # in the state dir: the job home of each app without a real one

_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18


def check_job_user_setting(settings: Settings) -> None:
    """POSTDEPLOY_JOB_USER, when set: a real unprivileged user, and we are root to use it."""
    if settings.job_user is None:
        return
    if os.geteuid() != 0:
        raise ConfigError(f"invalid POSTDEPLOY_JOB_USER: {settings.job_user!r} needs the "
                          "executor to run as root (to switch users); unset it or run as root")
    parse_user(settings.job_user, "invalid POSTDEPLOY_JOB_USER")


_cache: dict[str, object] = {}  # per process: whether namespaces work


def isolation_available() -> bool:
    """Whether jobs get a mount namespace here; probed once per process."""
    if "isolate" not in _cache:
        _cache["isolate"] = os.geteuid() == 0 and can_isolate()
    return bool(_cache["isolate"])


def describe_isolation(settings: Settings) -> tuple[int, str]:
    """A log level and one line for the worker's start-up: how far jobs are isolated."""
    if os.geteuid() != 0:
        return logging.WARNING, (
            f"jobs run as this executor's own user (uid {os.geteuid()}): they can read its "
            "state directory, environment and every app's checkout, and each other's; run "
            "the worker as root (each app's job then runs as the app's user) to isolate them")
    users = []
    for app in settings.apps:
        try:
            users.append(f"{app.name} as {app_user(settings, app).describe()}")
        except JobUserError as exc:
            users.append(f"{app.name}: {exc}")
    who = "; ".join(users) or "no apps"
    if not isolation_available():
        return logging.WARNING, (
            f"jobs run as their app's user ({who}), but this host gives them no mount "
            "namespace (needs CAP_SYS_ADMIN): a job can read other apps' checkouts")
    return logging.INFO, (f"jobs run as their app's user ({who}), each seeing only its "
                          "own checkout and home of the state directory")


@dataclass(frozen=True)
class JobPlace:
    """Where a job runs: its sandbox, its checkout and home as the job sees them, its user."""

    sandbox: Sandbox
    checkout: Path
    home: Path
    user_name: str | None = None  # for USER and LOGNAME: a passwd user's name

    def inside(self, real_checkout: Path, path: Path) -> Path:
        """``path`` (in the real checkout) as the job sees it."""
        return self.checkout / path.relative_to(real_checkout.resolve())


def place_job(settings: Settings, app: str, checkout: Path) -> JobPlace:
    """Who a job of ``app`` runs as, what it may see, and where it finds its files.

    Raises JobUserError when the app's user cannot be had on this host.
    """
    from postdeploy.config.settings import AppConfig

    user = app_user(settings, settings.app(app) or AppConfig(name=app)).user
    if user is None:  # not root: the job runs as we do, with our HOME when we have one
        own = passwd_user(os.geteuid(), os.getegid())
        home = Path(own.home) if own.home else prepare_home(settings.state_dir, app, None)
        return JobPlace(Sandbox(), checkout, home, own.name)
    # A passwd user's own HOME, so that `pm2 list` as that user shows what the job started.
    home = Path(user.home) if user.home else prepare_home(settings.state_dir, app, user)
    if not isolation_available():
        return JobPlace(Sandbox(uid=user.uid, gid=user.gid), checkout, home, user.name)
    hide = [str(settings.state_dir)]
    if settings.config_file is not None:
        hide.append(str(settings.config_file))  # it may hold the Redis URL and notify tokens
    for other in settings.apps:
        if other.name != app and other.path and not _contains(Path(other.path), checkout):
            hide.append(other.path)
    # The job sees our clone and its home under JOB_ROOT, whatever the real path: the
    # state dir may sit below a directory the job user may not enter (/root/...). A
    # `path` app's working copy and a user's own home are theirs: seen where they are.
    inside = JOB_ROOT / app
    binds = []
    if user.home is None:
        binds.append((str(home), str(inside / "home")))
        home = inside / "home"
    seen = checkout
    if _contains(settings.state_dir, checkout):
        seen = inside / "checkout"
        binds.append((str(checkout), str(seen)))
    sandbox = Sandbox(uid=user.uid, gid=user.gid, hide=tuple(hide),
                      root=str(JOB_ROOT), binds=tuple(binds))
    return JobPlace(sandbox, seen, home, user.name)


def job_user_env(place: JobPlace) -> dict[str, str]:
    """What a job's environment says about its user: HOME, USER; git trusts its checkout."""
    # The checkout belongs to the executor (a clone) or to someone else (a `path` app's
    # working copy), not to the job's user: without this, git in the job ("git rev-parse
    # HEAD", the guide's notification example) would refuse it as of dubious ownership.
    env = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory",
           "GIT_CONFIG_VALUE_0": str(place.checkout), "HOME": str(place.home)}
    if place.user_name is not None:
        env.update({"USER": place.user_name, "LOGNAME": place.user_name})
    return env


def prepare_job_root() -> None:
    """The (empty) directory sandboxed jobs find their files under; made by root."""
    if os.geteuid() != 0:
        return
    JOB_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
    info = JOB_ROOT.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
        raise OSError(f"{JOB_ROOT} must be a directory owned by root")


def _contains(parent: Path, child: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def can_isolate() -> bool:
    """Whether a job can get a mount namespace of its own here (tried in a child)."""
    _libc()  # loaded here, so every later job's child inherits it
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _unshare_mounts()
            code = 0
        except OSError:
            pass
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def prepare_home(state_dir: Path, app: str, user: JobUser | None) -> Path:
    """The app's job home, kept between runs: owned by the job user (or the executor)."""
    homes = state_dir / HOMES_DIR
    homes.mkdir(parents=True, exist_ok=True)
    home = homes / app
    home.mkdir(exist_ok=True)
    info = home.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{home} is not a directory")
    if user is not None:
        os.chmod(homes, 0o711)  # traversable, not listable: no job learns the other apps
        if (info.st_uid, info.st_gid) != (user.uid, user.gid):
            os.chown(home, user.uid, user.gid)
        os.chmod(home, 0o700)
    return home


def lock_down_state_dir(state_dir: Path) -> None:
    """Jobs may pass through the state dir to their checkout, never list it or read the rest."""
    if os.geteuid() != 0:
        return
    for path in (state_dir, state_dir / "checkouts"):
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, 0o711)


def enter_sandbox(sandbox: Sandbox) -> None:
    """In the job's process, before exec: hide what it must not see, then drop root."""
    uid, gid = sandbox.uid, sandbox.gid
    if sandbox.hide or sandbox.binds:
        _unshare_mounts()
        # Keep an fd on each source before covering its parents.
        kept = [(target, os.open(source, os.O_PATH | os.O_DIRECTORY))
                for source, target in sandbox.binds]
        for path in sandbox.hide:
            _cover(path)
        if sandbox.root is not None:
            _mount("tmpfs", sandbox.root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
        for target, fd in kept:
            os.makedirs(target, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", target, None, _MS_BIND | _MS_REC)
            os.close(fd)
    if uid is not None and gid is not None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


def _cover(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,mode=0755")
    else:
        _mount(os.devnull, path, None, _MS_BIND)


def _unshare_mounts() -> None:
    libc = _libc()
    if libc.unshare(_CLONE_NEWNS) != 0:
        raise _os_error("unshare")
    # Our mounts must not propagate back to the host.
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    libc = _libc()
    result = libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags),
                        _bytes(data))
    if result != 0:
        raise _os_error(f"mount {target}")


def _bytes(value: str | None) -> bytes | None:
    return value.encode() if value is not None else None


@functools.cache
def _libc() -> ctypes.CDLL:
    # Looked up once (find_library runs ldconfig, about 2 ms): in the worker, before a
    # job's fork, so the job's child only calls into it.
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _os_error(what: str) -> OSError:
    errno = ctypes.get_errno()
    return OSError(errno, f"{what}: {os.strerror(errno)}")
