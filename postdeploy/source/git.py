"""Where an app's code comes from: the deployed commit, files at a commit, a checkout.

A ``repo`` app is cloned once per host into the state directory and checked out
at the exact commit for each run; a ``path`` app is a working copy someone else
keeps in sync, so only its HEAD is read. Checking for a change is a ref lookup
(``git ls-remote`` or reading HEAD), never a clone or fetch, so its cost does not
grow with the repository.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import selectors
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal, TypeVar

import git

from postdeploy.config.redaction import redact_url
from postdeploy.config.settings import AppConfig
from postdeploy.errors import AppSpecError, GitError
from postdeploy.source.appspec import APPSPEC_FILE, MAX_APPSPEC_BYTES
from postdeploy.source.gitsafety import FETCH_REFSPEC, RepoAccess, own_clone_config

LS_REMOTE_TIMEOUT = 30.0  # seconds; a ref lookup that takes longer is a network problem
FETCH_TIMEOUT = 600.0  # seconds for a clone or fetch of a large repository
SHA_PATTERN = re.compile(r"^[0-9a-f]{40}$")
MAX_TREE_BYTES = 16 * 1024 * 1024  # a commit's root tree, read for appspec.yaml's mode

log = logging.getLogger(__name__)

class _Missing:
    """What a look at this host's objects finds when the commit is not there."""


_MISSING = _Missing()
_T = TypeVar("_T")
Fetch = Literal["if-missing", "first", "never"]


class CommitMissing(GitError):
    """This host does not have the commit (and was asked not to fetch it)."""


def is_sha(value: str) -> bool:
    return bool(SHA_PATTERN.match(value))


class AppSource:
    """Git access for one app on this host."""

    def __init__(self, app: AppConfig, state_dir: Path) -> None:
        self.app = app
        self.clone_dir = state_dir / "checkouts" / app.name
        # The URL git may store (no credentials) and how git gets them (see gitsafety).
        self.access = RepoAccess(app.repo or "")

    @property
    def workdir(self) -> Path:
        """The directory jobs run in (before POST_DEPLOY_FOLDER)."""
        return Path(self.app.path) if self.app.path else self.clone_dir

    def current_sha(self) -> str:
        """The commit the app is deployed from now: a cheap ref lookup."""
        if self.app.path:
            return self._path_head()
        ref = f"refs/heads/{self.app.branch}" if self.app.branch else "HEAD"
        out = self._git(None, ["ls-remote", "--", self.access.url, ref],
                        timeout=LS_REMOTE_TIMEOUT)
        for line in out.splitlines():
            sha, _, name = line.partition("\t")
            if name == ref and is_sha(sha):
                return sha
        what = f"branch {self.app.branch!r}" if self.app.branch else "HEAD"
        raise GitError(f"{what} not found in {self.app.source}; check the branch name")

    def read_appspec(self, sha: str, fetch: Fetch = "if-missing") -> bytes | None:
        """appspec.yaml at ``sha`` (None if that commit has none): the one reader of it.

        ``fetch``: "if-missing" fetches the commit when this host lacks it; "first"
        (a commit just seen for the first time, almost never here yet) fetches
        before looking; "never" raises CommitMissing instead. Raises AppSpecError
        for a file over MAX_APPSPEC_BYTES (refused by its size, before reading it),
        a symlink or a directory; GitError when the commit cannot be had.
        """
        if fetch == "never":
            found = self._appspec_in_objects(sha)
            if isinstance(found, _Missing):
                raise CommitMissing(f"commit {sha[:12]} is not on this host yet")
            return found
        with self._host_lock():
            return self._until_here(sha, lambda: self._appspec_in_objects(sha),
                                    fresh=fetch == "first")

    def ensure_commit(self, sha: str) -> None:
        """Make sure this host has ``sha`` (cloning or fetching); GitError if it cannot."""
        with self._host_lock():
            self._until_here(sha, lambda: True if self.has_commit(sha) else _MISSING)

    def prepare(self, sha: str) -> tuple[Path, bytes | None]:
        """A working tree at exactly ``sha`` and appspec.yaml there (see read_appspec).

        A ``path`` app's tree is used as it is. For a ``repo`` app the common case
        costs two git processes (checkout, clean): the commit check fetched it.
        """
        if self.app.path:
            return self.workdir, self.read_appspec(sha)
        with self._host_lock():
            self._own_clone()
            checkout = ["checkout", "--quiet", "--force", "--detach", sha]
            try:
                self._git(self.clone_dir, checkout, timeout=FETCH_TIMEOUT)
            except GitError:
                self._until_here(sha, lambda: True if self.has_commit(sha) else _MISSING)
                self._git(self.clone_dir, checkout, timeout=FETCH_TIMEOUT)
            # Keep ignored files (installed dependencies); drop stray untracked leftovers.
            self._git(self.clone_dir, ["clean", "-ffdq"], timeout=FETCH_TIMEOUT)
            return self.clone_dir, self._appspec_checked_out()

    def has_commit(self, sha: str) -> bool:
        try:
            self._git(self.workdir, ["cat-file", "-e", f"{sha}^{{commit}}"], timeout=30)
            return True
        except GitError:
            return False

    def _until_here(self, sha: str, look: Callable[[], _T | _Missing],
                    fresh: bool = False) -> _T:
        """``look()``'s answer once this host has ``sha``: as it is (unless ``fresh``),
        then after fetching the app's branches, then after fetching the commit itself
        (one force-pushed away). A ``path`` app's working copy is never fetched."""
        if self.app.path:
            fetches = []
        else:
            self._own_clone()
            # The URL itself, not "origin": what the remote is called is the job's.
            fetches = [["fetch", "--quiet", "--prune", "--force", self.access.url,
                        FETCH_REFSPEC], ["fetch", "--quiet", self.access.url, sha]]
        if not (fresh and fetches):
            if not isinstance(found := look(), _Missing):
                return found
        for index, fetch in enumerate(fetches):
            try:
                self._git(self.clone_dir, fetch, timeout=FETCH_TIMEOUT)
            except GitError:
                if index == 0:
                    raise  # the repository cannot be reached: say why
            if not isinstance(found := look(), _Missing):
                return found
        raise GitError(f"commit {sha[:12]} not found in {self.app.source}")

    def _appspec_checked_out(self) -> bytes | None:
        """Our own clone was just forced to the commit, so its file is the commit's:
        read there, it costs no git process."""
        try:
            info = (self.clone_dir / APPSPEC_FILE).lstat()
        except FileNotFoundError:
            return None
        _judge_appspec(info.st_mode, info.st_size)
        return (self.clone_dir / APPSPEC_FILE).read_bytes()

    def _appspec_in_objects(self, sha: str) -> bytes | None | _Missing:
        """appspec.yaml as the commit holds it (a ``path`` app's working copy may
        differ from its commit), or _MISSING when this host lacks the commit.

        One ``git cat-file --batch`` where ``ls-tree`` and ``cat-file blob`` took two
        processes: the commit's root tree first, for the entry's mode (a symlink, a
        directory or a submodule is refused), then the blob, refused by the size in
        its header before its content is read.
        """
        argv = ["git", *self._options(self.workdir), "cat-file", "--batch"]
        try:
            with _Batch(argv, self.workdir, self.access.environment(dict(os.environ)),
                        time.monotonic() + LS_REMOTE_TIMEOUT) as batch:
                tree = batch.get(f"{sha}^{{tree}}", MAX_TREE_BYTES)
                if tree is None:
                    return _MISSING
                entry = _tree_entry(tree, APPSPEC_FILE.encode(), len(sha) // 2)
                if entry is None:
                    return None
                mode, oid = entry
                _judge_appspec(mode, 0)
                blob = batch.get(oid, MAX_APPSPEC_BYTES, lambda size: _judge_appspec(mode, size))
                return _MISSING if blob is None else blob  # a partial clone: fetch it
        except subprocess.TimeoutExpired:
            raise GitError(f"git cat-file timed out after {LS_REMOTE_TIMEOUT:g} s for "
                           f"{self.app.source}") from None
        except OSError as exc:
            raise GitError(f"cannot run git: {exc}") from None

    def _path_head(self) -> str:
        # GitPython resolves HEAD from the ref files, without starting a git process:
        # about a tenth of the CPU of `git rev-parse`, and checks run every interval.
        try:
            with git.Repo(self.workdir) as repo:
                return str(git.SymbolicReference.dereference_recursive(repo, "HEAD"))
        except (git.NoSuchPathError, git.InvalidGitRepositoryError):
            raise GitError(f"{self.app.path} is not a git working copy; "
                           "check the app's 'path'") from None
        except ValueError as exc:
            raise GitError(f"{self.app.path}: cannot read HEAD ({exc})") from None

    def _own_clone(self) -> None:
        """Clone if needed; then make sure the clone's git directory is what we made.

        The job runs in the clone and may have replaced ``.git`` (a symlink, a file
        pointing elsewhere: git would then use someone else's config), so anything but
        a real directory is thrown away and cloned again; ``.git/config`` is rewritten
        whenever it differs from ours (a token in a URL from before, keys a job added).
        """
        git_dir = self.clone_dir / ".git"
        try:
            if git_dir.is_symlink() or (git_dir.exists() and not git_dir.is_dir()):
                log.warning("%s: %s is not the git directory we made; cloning again",
                            self.app.name, git_dir)
                _remove(self.clone_dir)
            if not git_dir.exists():
                self.clone_dir.parent.mkdir(parents=True, exist_ok=True)
                _remove(self.clone_dir)  # what a failed clone or a job left
                self._git(None, ["clone", "--quiet", "--no-checkout", "--",
                                 self.access.url, str(self.clone_dir)], timeout=FETCH_TIMEOUT)
            if own_clone_config(git_dir, self.access.url):
                log.debug("%s: rewrote %s/config", self.app.name, git_dir)
        except OSError as exc:
            raise GitError(f"cannot prepare the clone of {self.app.name} in "
                           f"{self.clone_dir}: {exc.strerror or exc}") from None

    @contextmanager
    def _host_lock(self) -> Iterator[None]:
        """Serialise git writes to this app's clone among the processes of this host."""
        self.clone_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.clone_dir.parent / f"{self.app.name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _options(self, cwd: Path | None) -> list[str]:
        """git's options for a command in ``cwd``: the access settings, and whose
        repository it is."""
        options = self.access.config_args()
        if cwd == self.clone_dir:
            # Our clone, by path and by name: git never looks further up for a
            # repository (a job may delete .git), and it works in the clone even
            # when the job user owns its files.
            return [*options, "-c", f"safe.directory={cwd}",
                    f"--git-dir={cwd / '.git'}", f"--work-tree={cwd}"]
        if self.app.path and cwd == self.workdir:
            # A working copy someone else owns (the app's user): trusted for this
            # command only, never by a change to the operator's git config.
            return [*options, "-c", f"safe.directory={cwd}",
                    "-c", f"safe.directory={cwd.resolve()}"]
        return options

    def _git(self, cwd: Path | None, args: list[str], timeout: float) -> str:
        return self._git_bytes(cwd, args, timeout).decode(errors="replace")

    def _git_bytes(self, cwd: Path | None, args: list[str], timeout: float) -> bytes:
        """Run one git command; its stdout, or GitError with git's own reason."""
        options = self._options(cwd)
        try:
            # The executor's environment is read here only to pass on the part git
            # needs (see gitsafety.ALLOWED_ENV); it holds no settings of ours.
            done = _run(["git", *options, *args], cwd,
                        self.access.environment(dict(os.environ)), timeout)
        except subprocess.TimeoutExpired:
            raise GitError(redact_url(f"git {args[0]} timed out after {timeout:g} s for "
                                      f"{self.app.source}")) from None
        except OSError as exc:
            raise GitError(f"cannot run git: {exc}") from None
        if done.returncode != 0:
            raise GitError(_describe_failure(args, done.stderr.decode(errors="replace"),
                                             done.returncode, self.app.source))
        return done.stdout


def _run(argv: list[str], cwd: Path | None, env: dict[str, str],
         timeout: float) -> subprocess.CompletedProcess[bytes]:
    """``subprocess.run(argv, capture_output=True, timeout=timeout)``, without its wait.

    subprocess waits for the exit that follows the output's end by polling, with
    sleeps from 0.5 ms up: about 0.6 ms lost per git process, several per commit.
    Here the process's pidfd wakes us the moment it exits. Raises TimeoutExpired
    (the process killed) when it takes longer than ``timeout`` in all.
    """
    deadline = time.monotonic() + timeout
    # A session of its own, so that stopping git stops the helpers it started too
    # (git-remote-http, ssh): killing git alone left them waiting on a silent host.
    with subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:
        try:
            out, err = _read_to_end(proc, deadline)
            _await_exit(proc, deadline)
        except BaseException:  # the timeout, Ctrl-C, a worker stopping: git goes too
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _read_to_end(proc: subprocess.Popen[bytes], deadline: float) -> tuple[bytes, bytes]:
    assert proc.stdout is not None and proc.stderr is not None
    chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    with selectors.DefaultSelector() as selector:
        for fd in chunks:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            ready = selector.select(remaining) if remaining > 0 else []
            if not ready:
                raise subprocess.TimeoutExpired(proc.args, 0)
            for key, _ in ready:
                if data := os.read(key.fd, 65536):
                    chunks[key.fd].append(data)
                else:
                    selector.unregister(key.fd)
    return b"".join(chunks[proc.stdout.fileno()]), b"".join(chunks[proc.stderr.fileno()])


def _await_exit(proc: subprocess.Popen[bytes], deadline: float) -> None:
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # a kernel before 5.3: subprocess's own (polling) wait
        proc.wait(max(0.0, deadline - time.monotonic()))
        return
    try:
        if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            raise subprocess.TimeoutExpired(proc.args, 0)
    finally:
        os.close(pidfd)
    proc.wait()  # it has exited: this only collects the status


class _Batch:
    """One ``git cat-file --batch``, asked for one object at a time, each answer read
    within the deadline; on leaving, git is killed with whatever it had not sent."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str],
                 deadline: float) -> None:
        self._proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      bufsize=0)
        self._deadline = deadline
        self._buffer = bytearray()

    def __enter__(self) -> _Batch:
        return self

    def __exit__(self, *_: object) -> None:
        self._proc.kill()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()
        self._proc.wait()

    def get(self, name: str, limit: int,
            judge: Callable[[int], None] | None = None) -> bytes | None:
        """The object's content; None if git has no such object. ``judge`` sees its
        size first and may refuse it; over ``limit`` bytes it is refused unread."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(name.encode() + b"\n")
        header = self._take(self._find(b"\n") + 1).split()
        if len(header) != 3 or not header[2].isdigit():
            return None  # "<name> missing" (or ambiguous)
        size = int(header[2])
        if judge is not None:
            judge(size)
        if size > limit:
            raise GitError(f"{name}: {size} bytes in git's objects; the limit is {limit}")
        return self._take(size + 1)[:-1]  # the content and git's newline after it

    def _find(self, byte: bytes) -> int:
        while (at := self._buffer.find(byte)) < 0:
            self._fill()
        return at

    def _take(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._fill()
        taken = bytes(self._buffer[:count])
        del self._buffer[:count]
        return taken

    def _fill(self) -> None:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        remaining = self._deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise subprocess.TimeoutExpired(self._proc.args, 0)
        chunk = os.read(fd, 65536)
        if not chunk:
            raise GitError("git cat-file stopped before its answer ended")
        self._buffer += chunk


def _tree_entry(tree: bytes, name: bytes, oid_size: int) -> tuple[int, str] | None:
    """(mode, object id) of ``name`` in a raw tree object (entries of ``<octal mode>
    <name>\\0<binary id>``), or None."""
    at = 0
    while at < len(tree):
        space = tree.index(b" ", at)
        nul = tree.index(b"\0", space)
        if tree[space + 1:nul] == name:
            return int(tree[at:space], 8), tree[nul + 1:nul + 1 + oid_size].hex()
        at = nul + 1 + oid_size
    return None


def _remove(path: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a directory tree."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _judge_appspec(mode: int, size: int) -> None:
    if not stat.S_ISREG(mode):
        raise AppSpecError(f"{APPSPEC_FILE} must be a regular file in the repository, "
                           "not a symlink or directory")
    if size > MAX_APPSPEC_BYTES:
        raise AppSpecError(f"{APPSPEC_FILE} is {size} bytes; the limit is "
                           f"{MAX_APPSPEC_BYTES} bytes")


def _describe_failure(args: list[str], stderr: str, status: int, source: str) -> str:
    # Keep git's own reason ("fatal: ...") on one line, with credentials hidden.
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    reason = next((line for line in lines if "fatal:" in line or "error:" in line),
                  lines[-1] if lines else f"exit status {status}")
    return redact_url(f"git {args[0]} failed for {source}: {reason}")
