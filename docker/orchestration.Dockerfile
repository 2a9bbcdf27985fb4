# Slim orchestration image: the Prefect server, the `epochwise` CLI (deployments apply, prepare, ...) and a
# worker for the Together backend. No torch: the `local` extra is not installed (see training.Dockerfile).
#
#   docker build -f docker/orchestration.Dockerfile -t epochwise-orchestration .      (from the repo root)
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/epochwise
COPY constraints.txt pyproject.toml README.md ./
COPY epochwise/ epochwise/
COPY flows/ flows/
COPY tasks/ tasks/
COPY blocks/ blocks/
COPY deployments/ deployments/
# The README's pinned install (constraints.txt pins prefect, fastapi and SQLAlchemy to versions that work).
RUN pip install -c constraints.txt '.'

# State: Prefect's home (locks, caches) and result storage live on a volume, see compose.yaml.
ENV PREFECT_HOME=/var/lib/epochwise/prefect \
    PREFECT_RESULTS_LOCAL_STORAGE_PATH=/var/lib/epochwise/results \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /srv/epochwise
CMD ["prefect", "server", "start", "--host", "0.0.0.0", "--port", "4200"]
