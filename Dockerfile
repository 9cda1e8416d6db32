# syntax=docker/dockerfile:1.7
# The `autovibe` image: the control API (with its scheduler), the metering proxy and the CPU
# model server of docker-compose.yml, one image with a different command each.
#
#   docker build -t autovibe:0.1.0 .        (or `docker compose build`)
#
# Stage `build` compiles llama.cpp (llama-cpp-python has no wheel for Linux on PyPI) and installs
# the locked environment with uv; stage `runtime` holds that environment, our source and the
# Debian tools the services call at run time, and runs as an unprivileged user.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    # A portable llama.cpp: the build host's CPU flags must not leak into the image.
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
WORKDIR /app
# Dependencies first (the slow layer, llama.cpp included), cached until uv.lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra postgres --no-install-project
COPY contracts ./contracts
COPY common ./common
COPY budget ./budget
COPY traffic ./traffic
COPY orchestrator ./orchestrator
COPY proxy ./proxy
COPY ledger ./ledger
COPY retention ./retention
COPY serving ./serving
COPY workers ./workers
COPY secretstore ./secretstore
# The project itself, editable: its code and the folders beside it (configs/, nomad-jobs/, …)
# are found from /app, as in a checkout.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --extra postgres

# -- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# bubblewrap + socat: the worker sandbox and its bridge to the proxy; git: workspaces and
# checkpoints; tmux: `autovibe worker attach`; qemu-utils: VM-disk checkpoints; libgomp1:
# llama.cpp's OpenMP threads; postgresql-client: `autovibe backup` with a PostgreSQL state DB
# (Debian 12 ships 15, the major version of the compose file's server: pg_dump must not be
# older than the server); iproute2 + iptables: `sandbox.network: transparent` (needs NET_ADMIN);
# chromium: the `card` payment method drives it with Playwright (no browser download).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      bubblewrap socat git tmux qemu-utils libgomp1 postgresql-client ca-certificates \
      iproute2 iptables chromium mmdebstrap \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 autovibe \
 && useradd --uid 10001 --gid autovibe --home-dir /home/autovibe --create-home autovibe \
 && install -d -o autovibe -g autovibe /mnt/data/autovibe
WORKDIR /app
COPY --from=build /app /app
COPY configs ./configs
COPY nomad-jobs ./nomad-jobs
COPY vm-templates ./vm-templates
COPY examples ./examples
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AUTOVIBE_DATA=/mnt/data/autovibe \
    AUTOVIBE_HOST=0.0.0.0
USER autovibe
EXPOSE 8400 8080 8500
# The API's health; the proxy and the model server get their own checks in docker-compose.yml.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8400/healthz', timeout=3)"]
ENTRYPOINT ["autovibe"]
CMD ["--help"]
