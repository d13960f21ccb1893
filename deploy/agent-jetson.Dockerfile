# fedclip-edge device agent for NVIDIA Jetson (JetPack 6 / L4T r36, aarch64). NOT VERIFIED ON
# HARDWARE: written against the bases' published contents; see docs/deploy.md.
#
# The base provides what must match the device's CUDA and JetPack and is never reinstalled here:
# PyTorch (NVIDIA's Jetson build), TensorRT and its Python bindings, CUDA, cuDNN, numpy.
# This recipe adds only the pinned packages of deploy/requirements-agent.txt, onnxruntime-gpu
# from the Jetson wheel index (never beside the CPU `onnxruntime`: both install one module), and
# fedclip-edge itself without dependencies (no open_clip, torchvision or matplotlib needed).
#
# Build on the Jetson (or an arm64 builder) from the repository root:
#   docker build -f deploy/agent-jetson.Dockerfile -t fedclip-edge-agent:jp6 .
# Run (GPU through the NVIDIA runtime; devices' group `video` for /dev/nvhost-*):
#   docker run --runtime nvidia --group-add video --env-file /etc/fedclip-edge/agent.env \
#     -v fedclip-cache:/var/lib/fedclip-edge/cache -v /etc/fedclip-edge/keys:/keys:ro \
#     -v /srv/data:/data:ro -v /srv/artifact:/artifact \
#     fedclip-edge-agent:jp6 agent --broker mqtts://broker.lan:8883 --job J --client-id dev-a \
#     --data /data --domain photo --artifacts /artifact --ca-certs /keys/ca.crt \
#     --key /keys/dev-a.key --aggregator-key /keys/aggregator.pub --artifact-key /keys/exporter.pub
# (/etc/fedclip-edge/keys: ca.crt, this device's dev-a.key owned by uid 10001 with mode 600, and
# the aggregator's and exporter's public keys; docs/deploy.md, "Keys".)
#
# dustynv/l4t-pytorch:r36.4.0 (jetson-containers: L4T r36.4, CUDA 12.6, PyTorch, TensorRT 10).
# nvcr.io/nvidia/l4t-jetpack:r36.4.0 has CUDA and TensorRT but no PyTorch: use it only with a
# torch wheel for JetPack 6 installed on top (docs/deploy.md, step 3).
ARG BASE_IMAGE=dustynv/l4t-pytorch:r36.4.0
FROM ${BASE_IMAGE}

# onnxruntime-gpu built for JetPack 6 / CUDA 12.6 (the Jetson AI Lab index; PyPI's aarch64
# onnxruntime-gpu wheels are not built for Jetson).
ARG JETSON_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ARG ORT_GPU_VERSION=1.21.0

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FEDCLIP_EDGE_CACHE=/var/lib/fedclip-edge/cache

# Fail the build early on a base that lacks what this recipe relies on instead of reinstalling it.
RUN python3 -c "import torch, tensorrt, numpy; print('base: torch', torch.__version__, \
'| tensorrt', tensorrt.__version__, '| numpy', numpy.__version__)"

WORKDIR /opt/fedclip-edge/src
COPY deploy/requirements-agent.txt deploy/requirements-agent.txt
RUN python3 -m pip install -r deploy/requirements-agent.txt \
 && python3 -m pip install --index-url "${JETSON_INDEX}" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && if python3 -m pip show onnxruntime >/dev/null 2>&1; then \
      echo "error: the CPU onnxruntime is installed beside onnxruntime-gpu" >&2; exit 1; fi \
 && python3 -c "import onnxruntime as o; p = o.get_available_providers(); print(p); \
assert 'CUDAExecutionProvider' in p, 'onnxruntime-gpu without CUDA provider'"

COPY pyproject.toml README.md ./
COPY fedclip_edge fedclip_edge
COPY exporters exporters
COPY device_agent device_agent
COPY broker broker
COPY benchmarks benchmarks
COPY serving serving
RUN python3 -m pip install --no-deps . \
 && python3 -c "import fedclip_edge.device_agent.agent, fedclip_edge.exporters.runtimes"

# Non-root. `video` owns the Jetson GPU device nodes; the host's GID must match (--group-add).
RUN useradd --system --uid 10001 --user-group --groups video --create-home \
      --home-dir /home/fedclip fedclip \
 && install -d -o fedclip -g fedclip /var/lib/fedclip-edge/cache
USER 10001:10001
WORKDIR /home/fedclip

# $FEDCLIP_EDGE_CACHE: the feature cache (agent-features/, re-used after a restart) and ONNX
# Runtime's TensorRT engine cache (ort-tensorrt/). /keys: the broker's CA, read-only.
VOLUME ["/var/lib/fedclip-edge/cache", "/keys"]

ENTRYPOINT ["fedclip-edge"]
CMD ["doctor"]
