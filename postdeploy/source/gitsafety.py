"""How the executor runs git so that a job can neither learn the repo's token nor run code.

A job runs in its app's clone, so anything git reads from that clone (``.git/config``,
``.git/hooks``, attributes) is the job's to write, and git runs as the executor's
user (root, in the image). Three rules follow:

- Credentials never touch the clone: the URL git sees has none; a credential helper
  given as command-line config hands them out, from variables only that git process
  gets, and only to the repo's own scheme and host (a rewritten remote, a redirect
  or an ``insteadOf`` elsewhere gets nothing).
- What repo config could run, command-line config overrides (hooks, fsmonitor,
  askpass, ssh; the credential helper list is emptied, then ours and the operator's
  own are added), and our clone's ``.git/config`` is ours: rewritten from the few
  keys git needs whenever it differs (filters, includes, URL rewrites a job adds).
- git's environment is built from an allow-list: the executor's own secrets
  (POSTDEPLOY_*, FLOWER_*, anything else) never reach a process a repo could steer.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import git

# Operator settings git needs to reach a repo (ssh keys, proxies, CAs, its own config
# files); nothing else of the executor's environment is passed on.
ALLOWED_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "XDG_CONFIG_HOME",
    "SSH_AUTH_SOCK", "GIT_SSH_COMMAND", "GIT_SSH", "GIT_SSH_VARIANT", "GIT_PROXY_COMMAND",
    "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM", "GIT_CONFIG_NOSYSTEM",
    "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
)
# Never prompt (terminal or askpass program), never run a transport that executes
# commands, and no proxy command a repo's core.gitProxy names (an empty
# GIT_PROXY_COMMAND makes git ignore that key); messages in English, since we read
# git's "fatal:" lines.
FIXED_ENV = {
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_ASKPASS": "",
    "GIT_ALLOW_PROTOCOL": "file:git:http:https:ssh",
    "LANGUAGE": "C",
    "LC_ALL": "C",
}
USERNAME_VAR = "POSTDEPLOY_GIT_USERNAME"
PASSWORD_VAR = "POSTDEPLOY_GIT_PASSWORD"
ORIGIN_VAR = "POSTDEPLOY_GIT_ORIGIN"

# Answers git's "get" only for the repo's own scheme://host[:port]; says nothing to
# "store" and "erase". Values come from the environment, never from the command line
# (which any local user can read in /proc).
CREDENTIAL_HELPER = (
    "!f() { test \"$1\" = get || return 0; p=; h=; "
    "while IFS= read -r line && test -n \"$line\"; do case \"$line\" in "
    "protocol=*) p=${line#protocol=};; host=*) h=${line#host=};; esac; done; "
    f"test \"$p://$h\" = \"${ORIGIN_VAR}\" || return 0; "
    f"printf 'username=%s\\npassword=%s\\n' \"${USERNAME_VAR}\" \"${PASSWORD_VAR}\"; }}; f"
)
# Repo config a job may write that would make our git run a program. Command-line
# config is read last, so each of these wins. Credential helpers are a list, handled
# in RepoAccess.environment.
OVERRIDES = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.askPass=",
    # ssh must never wait for a password or a host-key answer either. As git config
    # it is only a default: an operator's GIT_SSH_COMMAND (say, with a deploy key) wins.
    "core.sshCommand=ssh -o BatchMode=yes -o ConnectTimeout=15",
)
# The keys a clone's [core] may keep (all booleans or small numbers, written by
# `git clone` after probing the filesystem).
CORE_KEYS = ("repositoryformatversion", "filemode", "bare", "logallrefupdates",
             "symlinks", "ignorecase", "precomposeunicode")
FETCH_REFSPEC = "+refs/heads/*:refs/remotes/origin/*"
MAX_CONFIG_BYTES = 65536  # ours is a few hundred bytes

log = logging.getLogger(__name__)


class RepoAccess:
    """A repo URL split into what git may store (``url``) and what it may only be handed."""

    def __init__(self, repo: str) -> None:
        self.url = repo
        self.username: str | None = None
        self.password = ""
        self.origin = ""
        parts = urlsplit(repo)
        if parts.scheme.lower() in ("http", "https") and "@" in parts.netloc:
            userinfo, _, hostport = parts.netloc.rpartition("@")
            user, _, password = userinfo.partition(":")
            self.url = urlunsplit(parts._replace(netloc=hostport))
            self.username, self.password = unquote(user), unquote(password)
            # git names the host as the URL has it (port included, case kept).
            self.origin = f"{parts.scheme.lower()}://{hostport}"

    def config_args(self) -> list[str]:
        args: list[str] = []
        for item in OVERRIDES:
            args += ["-c", item]
        return args

    def environment(self, environ: dict[str, str]) -> dict[str, str]:
        """git's environment: the allow-listed part of ``environ``, our fixed values,
        the credential helpers, and this repo's credentials (for our helper only)."""
        env = {name: environ[name] for name in ALLOWED_ENV if name in environ}
        env.setdefault("GIT_PROXY_COMMAND", "")
        env.update(FIXED_ENV)
        # An empty helper empties the list built so far (system, global, and the
        # repo's, which a job may have written); then ours, then the operator's own
        # (system and global config) again. GIT_CONFIG_KEY_n takes any key as it is,
        # where `-c` would split a URL-scoped key at its first '='.
        helpers = [("credential.helper", "")]
        if self.username is not None:
            helpers.append(("credential.helper", CREDENTIAL_HELPER))
            env.update({USERNAME_VAR: self.username, PASSWORD_VAR: self.password,
                        ORIGIN_VAR: self.origin})
        helpers += operator_helpers(env)
        env["GIT_CONFIG_COUNT"] = str(len(helpers))
        for index, (key, value) in enumerate(helpers):
            env[f"GIT_CONFIG_KEY_{index}"] = key
            env[f"GIT_CONFIG_VALUE_{index}"] = value
        return env


_operator_helpers: list[tuple[str, str]] | None = None


def operator_helpers(env: dict[str, str]) -> list[tuple[str, str]]:
    """Credential helpers of the system and global git config, in order (read once)."""
    global _operator_helpers
    if _operator_helpers is None:
        found: list[tuple[str, str]] = []
        try:
            # A git dir that cannot exist: no repository's config is read.
            done = subprocess.run(
                ["git", "config", "--show-scope", "-z", "--get-regexp",
                 r"^credential\..*helper$"],
                env={**env, "GIT_DIR": os.path.join(os.devnull, "none")},
                stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
            fields = done.stdout.decode(errors="replace").split("\0")
            for scope, entry in zip(fields[0::2], fields[1::2], strict=False):
                key, _, value = entry.partition("\n")
                if scope in ("system", "global"):
                    found.append((key, value))
        except (OSError, subprocess.TimeoutExpired):
            log.warning("cannot read git's credential helpers; using none of them")
        _operator_helpers = found
    return _operator_helpers


def clone_config(git_dir: Path | None, url: str) -> str:
    """The ``.git/config`` our clone must have: its [core] probe results and origin."""
    core = _core_values(git_dir / "config") if git_dir is not None else {}
    core.setdefault("repositoryformatversion", "0")
    core.setdefault("bare", "false")
    # Quoted, so that '#' or ';' in a URL is not a comment; no line breaks in config.
    quoted = url.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "")
    lines = ["[core]", *(f"\t{key} = {value}" for key, value in core.items()),
             '[remote "origin"]', f'\turl = "{quoted}"', f"\tfetch = {FETCH_REFSPEC}"]
    return "\n".join(lines) + "\n"


def _core_values(path: Path) -> dict[str, str]:
    """The allowed [core] keys of an existing config, with plain boolean/number values."""
    core: dict[str, str] = {}
    try:
        reader = git.GitConfigParser(str(path), read_only=True, merge_includes=False)
        reader.read()
    except Exception:  # noqa: BLE001 - a config GitPython cannot read: start afresh
        return core
    if reader.has_section("core"):
        for key in CORE_KEYS:
            if reader.has_option("core", key):
                value = str(reader.get("core", key)).strip().lower()
                if value in ("true", "false", "0", "1"):
                    core[key] = value
    return core


def own_clone_config(git_dir: Path, url: str) -> bool:
    """Make ``git_dir/config`` exactly ours (see :func:`clone_config`); True if it changed.

    Also removes ``commondir``, which would make git read another directory's config.
    """
    path = git_dir / "config"
    changed = False
    try:
        # A config a job blew up to gigabytes is not worth reading: it is replaced.
        small = not path.is_symlink() and path.stat().st_size <= MAX_CONFIG_BYTES
        current = path.read_text() if small else None
    except (OSError, UnicodeDecodeError):
        current = None
    wanted = clone_config(git_dir, url) if current is not None else clone_config(None, url)
    if current != wanted:
        # A new file renamed into place: a symlink planted as .git/config is replaced,
        # never followed.
        fd, temp = tempfile.mkstemp(dir=git_dir, prefix="config.")
        with os.fdopen(fd, "w") as handle:
            handle.write(wanted)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
        changed = True
    commondir = git_dir / "commondir"
    if commondir.exists() or commondir.is_symlink():
        commondir.unlink()
        changed = True
    return changed
