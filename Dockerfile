# token-budget-router: the router (`budget-router serve`) and the simulated
# vLLM pool (`budget-router backend`) in one image, built from this repo.
#
#   docker build -t token-budget-router:0.1.0 .
#   docker run --rm token-budget-router:0.1.0 --help
#
# compose/docker-compose.yaml builds and uses it for the router and the
# default (simulated) pools.

# 3.11: the oldest Python the package supports (pyproject requires-python),
# the one CI tests; -slim keeps the image small (no compilers needed: every
# dependency ships manylinux wheels).
ARG PYTHON_IMAGE=python:3.11-slim

# --- build: a wheel of the package plus wheels of every dependency ------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
RUN pip wheel --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The project's own wheel by file name, its dependencies pinned by the wheels
# the build stage resolved (--no-index: nothing newer sneaks in here).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels /wheels/token_budget_router-*.whl && \
    # xds-protos overwrites opentelemetry/proto/ with an older copy; restore
    # the OTLP exporters' own version (see Makefile).
    pip install --no-index --find-links /wheels --no-deps --force-reinstall \
        "opentelemetry-proto==$(python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

# Non-root: nothing here needs privileges (every port is above 1024).
# 10001 is above the range distributions give to system and login users, so
# it never collides with a host user when a volume is shared.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/budget-router \
        --shell /usr/sbin/nologin budget \
    && mkdir -p /var/lib/budget-router /etc/budget-router \
    && chown budget:budget /var/lib/budget-router
USER 10001:10001
WORKDIR /var/lib/budget-router

# 50051: router gRPC (ext_proc + grpc.health.v1), worker i on 50051+i.
# 9464: router Prometheus /metrics, worker i on 9464+i.
# 8000: simulated vLLM pool (vLLM's default port).
EXPOSE 50051 9464 8000

# No HEALTHCHECK here: the same image runs the router (gRPC health) and the
# pools (HTTP /health); compose/docker-compose.yaml defines one per service.
ENTRYPOINT ["budget-router"]
CMD ["serve", "--config", "/etc/budget-router/budget-router.toml"]
