# syntax=docker/dockerfile:1
# The image manifests/ deploys: docker build -t ghcr.io/<you>/opsbot:0.1.0 .
# tests/unit/test_dockerfile.py checks what this file names (paths, commands, the user).

# ---- build: opsbot and every dependency as wheels, at the versions the tests passed with
FROM python:3.11-slim AS build
# A compiler only for a dependency that has no wheel for this platform; none of it reaches the image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY bot ./bot
COPY commands ./commands
RUN pip wheel --no-cache-dir -c constraints.txt --wheel-dir /wheels .

# ---- runtime: the wheels, nothing to build them with
FROM python:3.11-slim AS runtime
# Read-only root filesystem: no .pyc written at run time (pip compiled them at install), HOME and
# TMPDIR on the /tmp emptyDir, the audit spool on its own volume (manifests/base/deployment.yaml).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    OPSBOT_SPOOL_DIR=/var/lib/opsbot/spool \
    OPSBOT_CONFIG=/app/policies/default.yaml
# The wheels are bind-mounted from the build stage, so they are in no layer of this image; pip is
# removed after it has installed them (nothing installs anything at run time).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels opsbot \
 && pip uninstall -y pip \
 && groupadd --gid 10001 opsbot \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin opsbot \
 && mkdir -p /var/lib/opsbot/spool \
 && chown 10001:10001 /var/lib/opsbot/spool
WORKDIR /app
# The default policy (deny everything) for a bare `docker run`; the manifests mount their own.
COPY policies ./policies
USER 10001:10001
EXPOSE 3000
ENTRYPOINT ["opsbot"]
CMD ["serve"]
