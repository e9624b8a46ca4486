# The recommendation API in an image: Gunicorn with Uvicorn workers, as an unprivileged user.
#
#   docker build -t recommender .
#   docker run -p 8000:8000 recommender     # embedded store; generates the data on first start
#
# docker-compose.yml runs it against PostgreSQL and Redis; docs/deployment.md explains both.

ARG PYTHON_IMAGE=python:3.11-slim

# Build stage: a virtual environment holding the runtime dependencies and the package.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build

# Only the runtime dependencies: pyproject.toml's [project] dependencies, each held to the
# version requirements.lock pins. The lock also pins the development extras (pytest, dvc,
# locust, matplotlib, ...), which the image leaves out. Every dependency ships a wheel, so no
# compiler is needed. Copied before the source, so a code change reuses this layer.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; \
        print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > runtime.txt \
    && pip install --requirement runtime.txt --constraint requirements.lock

COPY README.md ./
COPY src ./src
# pip check: the package's own requirements are met by what the lock let in.
RUN pip install --no-deps . && pip check

# Runtime stage: the environment alone, without pip's build leftovers.
FROM ${PYTHON_IMAGE}
# A fixed numeric id, so orchestrators can verify "not root" without reading /etc/passwd.
# /data is the data directory's mount point; a named volume mounted there starts out owned by
# this user and so stays writable (prepared user features are written beside the data).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /srv/recommender \
        --shell /usr/sbin/nologin recommender \
    && install --directory --owner=recommender --group=recommender /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /srv/recommender

EXPOSE 8000
# Ready, not merely alive: /readyz answers 503 while PostgreSQL is unreachable. The long start
# period covers the first start without data, which generates and prepares it (about 20 s on
# two cores, more on smaller machines). urllib, since the slim image has no curl; no proxy, as
# the request never leaves the container.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; \
        port = os.environ.get('RECOMMENDER_PORT', '8000'); \
        r.build_opener(r.ProxyHandler({})).open(f'http://127.0.0.1:{port}/readyz', timeout=4)"]
CMD ["recommender", "serve", "--host", "0.0.0.0"]
