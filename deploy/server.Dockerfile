# fedclip-edge server image: the aggregator (and, for a local trial, CPU agents and the export
# that prepares their artifact). Any x86_64 or arm64 Linux host; no GPU.
#
#   docker build -f deploy/server.Dockerfile -t fedclip-edge-server .
#   docker run --rm fedclip-edge-server aggregate --help
#
# torch comes from PyTorch's CPU wheel index (PyPI's Linux x86_64 wheel pulls gigabytes of CUDA
# libraries an aggregator never uses); everything else from PyPI, pinned by ci/constraints.txt
# and deploy/requirements-agent.txt.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FEDCLIP_EDGE_CACHE=/var/lib/fedclip-edge/cache

WORKDIR /opt/fedclip-edge/src
COPY ci/constraints.txt ci/constraints.txt
COPY deploy/requirements-agent.txt deploy/requirements-agent.txt
COPY deploy/requirements-server.txt deploy/requirements-server.txt
# torch and torchvision at the versions CI pins, CPU builds.
RUN python -m pip install --index-url "${TORCH_INDEX}" \
      "$(grep '^torch==' ci/constraints.txt)" "$(grep '^torchvision==' ci/constraints.txt)" \
 && python -m pip install -r deploy/requirements-agent.txt -r deploy/requirements-server.txt

COPY pyproject.toml README.md ./
COPY fedclip_edge fedclip_edge
COPY exporters exporters
COPY device_agent device_agent
COPY broker broker
COPY benchmarks benchmarks
COPY serving serving
# --no-deps: every dependency is already pinned above; pip check proves none is missing.
RUN python -m pip install --no-deps . \
 && python -m pip check \
 && fedclip-edge --version

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedclip fedclip \
 && install -d -o fedclip -g fedclip /var/lib/fedclip-edge /var/lib/fedclip-edge/cache
USER 10001:10001
WORKDIR /var/lib/fedclip-edge

# Aggregator state (--out, --resume), caches; the broker's CA under /keys (read-only).
VOLUME ["/var/lib/fedclip-edge", "/keys"]

ENTRYPOINT ["fedclip-edge"]
CMD ["--help"]
