"""`postdeploy validate`: check an app repository's POST_DEPLOY set-up before deploying.

Checks what a run would trip over: appspec.yaml syntax and shapes, the
folder (exists, stays inside the repo, symlinks included), the command, the
script it names, and the timeout; given the app, who its job runs as. Values are
never printed (some are secrets).
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from postdeploy.config.settings import AppConfig, Settings
from postdeploy.errors import AppSpecError, JobUserError
from postdeploy.run.user import app_user
from postdeploy.source.appspec import (
    APPSPEC_FILE,
    DEFAULT_TIMEOUT,
    SCOPE_INSTANCE,
    JobSpec,
    parse_appspec,
    resolve_folder,
)
from postdeploy.source.readiness import gate_url

ERROR, WARNING, OK = "error", "warning", "ok"
EXECUTABLE_MODE, SYMLINK_MODE = "100755", "120000"  # git's file modes
# Commands that take a script file as their first non-option argument.
INTERPRETERS = {"bash", "sh", "zsh", "dash", "python", "python3", "node", "ruby", "perl",
                "php", "deno", "bun", "tsx", "ts-node"}


@dataclass(frozen=True)
class Finding:
    level: str  # "error", "warning" or "ok"
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.message}"


def validate_app_dir(directory: Path) -> list[Finding]:
    """Everything wrong (and right) with ``directory``'s POST_DEPLOY set-up."""
    if not directory.is_dir():
        return [Finding(ERROR, f"{directory} is not a directory; give the app repository's "
                               "root")]
    findings: list[Finding] = []
    appspec = directory / APPSPEC_FILE
    if not appspec.is_file():
        return [Finding(ERROR, f"no {APPSPEC_FILE} in {directory}; the executor reads the "
                               "job from its 'envs' (POST_DEPLOY_COMMAND, ...)")]
    try:
        # Empty fallback env: what the file alone says, as a fresh executor would see it.
        spec = parse_appspec(appspec.read_bytes(), {})
    except AppSpecError as exc:
        return [Finding(ERROR, f"{exc}; a run of this commit would end as 'error'")]
    except OSError as exc:
        return [Finding(ERROR, f"cannot read {APPSPEC_FILE}: {exc.strerror}")]
    findings.append(Finding(OK, f"{APPSPEC_FILE} parses"))
    findings += [Finding(WARNING, f"{w} (the job still runs)") for w in spec.warnings]
    if not spec.warnings:
        findings.append(Finding(OK, f"timeout {spec.timeout} s"
                                    + (" (the default)" if spec.timeout == DEFAULT_TIMEOUT
                                       else "")))

    try:
        workdir = resolve_folder(directory, spec.folder)
        findings.append(Finding(OK, f"folder {spec.folder or '.'} is inside the repository"))
    except AppSpecError as exc:
        findings.append(Finding(ERROR, f"{exc}; nothing would be executed"))
        workdir = None

    if spec.command is None:
        findings.append(Finding(ERROR, "POST_DEPLOY_COMMAND is not set; no job would run "
                                       "(add it under 'envs')"))
    else:
        findings.append(Finding(OK, "POST_DEPLOY_COMMAND is set"))
        if workdir is not None:
            findings += _script_findings(spec.command, workdir, directory)
    findings += placement_findings(spec)
    findings += _git_findings(directory)
    return findings


def placement_findings(spec: JobSpec) -> list[Finding]:
    """Scope and readiness gate (their malformed values already failed the parse)."""
    findings = [Finding(OK, "scope instance: once per deployment on every host that serves "
                            "the app" if spec.scope == SCOPE_INSTANCE else
                            "scope app (the default): once per deployment across the fleet")]
    if spec.gate is None:
        return findings
    what = "answers 2xx with the commit in its body" if spec.gate.wait_for_commit \
        else "answers 2xx"
    findings.append(Finding(OK, f"waits up to {spec.gate.timeout} s until "
                                f"POST_DEPLOY_WAIT_URL {what}"))
    try:
        gate_url(spec.gate, {**spec.env, "COMMIT_SHA": "0" * 40, "POST_DEPLOY_APP": "app"})
    except AppSpecError as exc:
        # Variables may come from the executor's environment on the host: only a warning.
        findings.append(Finding(WARNING, f"{exc} (unless the executor's environment sets "
                                         "it on every host)"))
    return findings


def _script_findings(command: str, workdir: Path, root: Path) -> list[Finding]:
    """Check the script the command names, when it names one we can recognise."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        return [Finding(ERROR, f"POST_DEPLOY_COMMAND cannot be parsed by a shell ({exc})")]
    if not words:
        return []
    program, rest = words[0], words[1:]
    direct = "/" in program  # ./seed.sh or bin/seed: executed itself, needs the x bit
    if direct:
        script = program
    elif os.path.basename(program) in INTERPRETERS:
        args = [w for w in rest if not w.startswith("-")]
        if not args or any(w in ("-c", "-e", "-m") for w in rest):
            return []  # inline code (bash -c '...', python -m x): nothing to look for
        script = args[0]
    else:
        return []  # npm, make, a tool on PATH: not something we can check here
    path = (workdir / script).resolve()
    shown = os.path.relpath(workdir / script, root)
    if root.resolve() not in path.parents:
        return [Finding(ERROR, f"script {shown} lies outside the repository; the executor "
                               "only has the repository's files")]
    if not path.is_file():
        return [Finding(ERROR, f"script {shown} does not exist; the command would fail "
                               "(paths are relative to POST_DEPLOY_FOLDER)")]
    if not os.access(path, os.R_OK):
        return [Finding(ERROR, f"script {shown} is not readable")]
    mode = committed_mode(root, path)
    if mode is None:  # not a git repository: the files are all we have
        if direct and not os.access(path, os.X_OK):
            return [Finding(ERROR, f"script {shown} is run directly but is not executable; "
                                   f"chmod +x it (and commit) or run it with 'bash {script}'")]
        return [Finding(OK, f"script {shown} exists")]
    if not mode:
        return [Finding(WARNING, f"script {shown} is not committed; the executor runs what "
                                 "is committed, so add and commit it before deploying")]
    # The executor runs the commit's file mode, whatever this working copy says
    # (with core.fileMode false git ignores the working copy's x bit altogether).
    if direct and mode not in (EXECUTABLE_MODE, SYMLINK_MODE):
        return [Finding(ERROR, f"script {shown} is run directly but is not executable in the "
                               f"commit (mode {mode}); run `git update-index --chmod=+x "
                               f"{shown}` and commit, or run it with 'bash {script}'")]
    return [Finding(OK, f"script {shown} exists" + (" and is executable in the commit"
                                                    if direct else ""))]


def committed_mode(root: Path, path: Path) -> str | None:
    """Git's mode of ``path`` at HEAD (else in the index): '100755', ...; '' when not
    committed, None when ``root`` is not in a git repository."""
    for command in (["ls-tree", "HEAD", "--"], ["ls-files", "--stage", "--"]):
        try:
            result = subprocess.run(["git", "-C", str(root), *command,
                                     os.path.relpath(path, root.resolve())],
                                    capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if result.returncode == 0 and result.stdout:
            return result.stdout.split(maxsplit=1)[0]
        if result.returncode != 0 and command[0] == "ls-files":
            return None  # not a repository
    return ""


def _git_findings(directory: Path) -> list[Finding]:
    """The executor reads the committed appspec, not the working copy: say if they differ."""
    try:
        result = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--",
                                 "."], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return [Finding(WARNING, f"{directory} is not a git repository; the executor reads "
                                 "appspec.yaml and scripts from commits")]
    if result.stdout.strip():
        return [Finding(WARNING, "uncommitted changes; the executor runs what is committed, "
                                 "so commit them before deploying")]
    return []


def job_user_finding(settings: Settings, app: AppConfig) -> Finding:
    """Who ``app``'s job runs as on this host, and why; nothing is allocated or written."""
    try:
        who = app_user(settings, app, allocate=False)
    except JobUserError as exc:
        return Finding(ERROR, f"{exc}; its runs would end as 'error'")
    return Finding(OK, f"job of app {app.name} runs as {who.describe()}")


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == ERROR for f in findings)
