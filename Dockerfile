# The lcmq image: CLI, producer, Celery worker and migrations (docker-compose.yml runs them all).
#
# torch is pinned and installed first, from a PyTorch wheel index, before the project: the
# project's bare `torch>=2.4` would otherwise resolve to whatever PyPI serves at build time.
# Keep the pin equal to TORCH in the Makefile (tests/unit/test_compose.py checks it).
#
# TORCH_INDEX_URL picks the torch build:
#   CUDA (default; what worker-gpu needs, and it runs on CPU too):
#     docker build -t lcmq:latest .
#     docker build -t lcmq:latest --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   CPU only (a much smaller image, no GPU worker):
#     docker build -t lcmq:latest --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The cuXYZ must be one that torch 2.13.0 is published for and that the host's NVIDIA driver
# supports (https://pytorch.org/get-started/locally/ lists both).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Its own layer, before the sources are copied: a code change does not download torch again.
# The constraint keeps `pip install .` below from replacing it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && echo "torch==2.13.0" > /etc/pip-torch-constraint.txt

COPY . .
RUN pip install --constraint /etc/pip-torch-constraint.txt . \
    && rm -rf build ./*.egg-info

# Run as a user; /app (the embedded .lcmq/ home) and /cache (the model-cache volume) are its own.
RUN useradd --create-home --uid 1000 lcmq \
    && mkdir -p /cache \
    && chown lcmq:lcmq /app /cache
USER lcmq

CMD ["lcmq", "--help"]
