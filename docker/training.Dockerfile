# Training image: everything in the orchestration image plus the local PyTorch + PEFT backend (CPU torch).
# Runs the worker, so flow runs that train locally find torch; it runs Together-backed runs as well.
#
#   docker build -f docker/training.Dockerfile -t epochwise-training .                 (from the repo root)
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

# constraints.txt pins the CPU build of torch (a +cpu version), which lives on PyTorch's own index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${TORCH_INDEX_URL}

WORKDIR /opt/epochwise
COPY constraints.txt pyproject.toml README.md ./
COPY epochwise/ epochwise/
COPY flows/ flows/
COPY tasks/ tasks/
COPY blocks/ blocks/
COPY deployments/ deployments/
# The README's pinned install, with the local trainer.
RUN pip install -c constraints.txt '.[local]'

ENV PREFECT_HOME=/var/lib/epochwise/prefect \
    PREFECT_RESULTS_LOCAL_STORAGE_PATH=/var/lib/epochwise/results \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    EPOCHWISE_LOCAL__CACHE_DIR=/var/lib/epochwise/models
WORKDIR /srv/epochwise
CMD ["prefect", "worker", "start", "--pool", "epochwise"]
