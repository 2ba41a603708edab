# syntax=docker/dockerfile:1
# mf-worker container image: `docker build -t mf-worker .`
#   docker run --rm -e MF_DATABASE_URL=postgresql://… mf-worker migrate
#   docker run -d -e MF_DATABASE_URL=postgresql://… -p 9464:9464 mf-worker        # `run`
# Extras (e.g. the `openai` generator's HTTP client): --build-arg EXTRAS=openai
# Secrets: pass MF_DATABASE_URL, or mount files and set CREDENTIALS_DIRECTORY to their directory
# (the daemon reads $CREDENTIALS_DIRECTORY/mf_database_url and …/mf_llm_api_key).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the project's wheel and every dependency's wheel ----------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# Wheels only: the final stage installs them with no index, no compiler and no build backend.
# requirements.txt pins exactly the mf-worker version just built (with the chosen extras).
RUN pip wheel --wheel-dir /wheels ".${EXTRAS:+[$EXTRAS]}" \
    && wheel="$(echo /wheels/mf_worker-*.whl)" && version="${wheel#/wheels/mf_worker-}" \
    && version="${version%%-*}" \
    && echo "mf-worker${EXTRAS:+[$EXTRAS]}==${version}" > /wheels/requirements.txt

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="mf-worker" \
      org.opencontainers.image.description="Many Futures queue worker on PostgreSQL"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    MF_LOG_FORMAT=json \
    MF_METRICS_ADDR=0.0.0.0:9464
RUN groupadd --system --gid 10001 mf \
    && useradd --system --uid 10001 --gid mf --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin mf
# The wheels are bind-mounted from the build stage, so they never become a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels --requirement /wheels/requirements.txt \
    && mf-worker --version
USER 10001:10001
EXPOSE 9464
# Liveness of the claim loop (/healthz answers 503 once it is wedged); no curl in a slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('MF_METRICS_ADDR', ':9464').rpartition(':')[2]; sys.exit(0 if not port or port == '0' else urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]
# SIGTERM starts a graceful drain (MF_SHUTDOWN_GRACE, default 30 s): give the container longer,
# e.g. `docker stop -t 45`, compose `stop_grace_period: 45s`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mf-worker"]
CMD ["run"]
