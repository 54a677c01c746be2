# syntax=docker/dockerfile:1
#
# medft's training image:
#   docker run --gpus all -v medft:/var/lib/medft medft:latest train --config /app/configs/r1-llama-8b-en.yaml
#   docker run --rm medft:latest registry list --store s3://bucket/prefix
#
# Base: NVIDIA's CUDA 13.0 "base" flavour on Ubuntu 24.04 (whose Python is 3.12). The torch pinned in
# constraints.txt is PyPI's default Linux wheel, built for CUDA 13.0, which satisfies the "12.8 or newer"
# requirement (the first CUDA with Blackwell kernels) without a second package index. That wheel brings its
# own cuBLAS, cuDNN and NCCL as Python packages, so the larger "runtime"/"devel" flavours would only ship
# them twice; the base flavour adds what the NVIDIA container toolkit reads (NVIDIA_VISIBLE_DEVICES,
# NVIDIA_DRIVER_CAPABILITIES and NVIDIA_REQUIRE_CUDA, which makes a host whose driver is too old for
# CUDA 13.0, i.e. older than 580, refuse to start the container with a clear message instead of torch
# failing later). Keep this tag's CUDA major/minor equal to the torch wheel's when bumping torch.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------------------
# Build stage: a compiler and Python headers in case a dependency has no wheel; none of it reaches the
# final image, only the finished virtual environment does.
FROM ${CUDA_IMAGE} AS build

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake python3 python3-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first, against empty package directories, so that editing medft's code re-runs only the
# small install below and not the gigabytes of torch/unsloth wheels. Same constraints file as CI
# (`make install`), with the gpu, modelscope and tracking extras: the image gets exactly the pinned set CI tested.
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir job registry \
 && touch job/__init__.py registry/__init__.py \
 && pip install -c constraints.txt '.[gpu,modelscope,tracking]'

# llama.cpp's llama-quantize, which export.gguf needs for k-quants (q4_k_m, ...): built from the llama.cpp sources
# vendored in the llama-cpp-python sdist pinned in constraints.txt, the binary only, statically linked against
# llama.cpp (no OpenMP, no OpenSSL, portable CPU code: it quantizes once per export, speed hardly matters), into
# the venv's bin/ so the one COPY of /opt/venv carries it onto PATH. cmake and the sources stay in this stage.
RUN pip download --no-deps --no-binary :all: -c constraints.txt -d /tmp/llama llama-cpp-python \
 && tar -xzf /tmp/llama/llama_cpp_python-*.tar.gz -C /tmp/llama \
 && cmake -S /tmp/llama/llama_cpp_python-*/vendor/llama.cpp -B /tmp/llama/build -DCMAKE_BUILD_TYPE=Release \
      -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
 && cmake --build /tmp/llama/build --target llama-quantize -j "$(nproc)" \
 && install -m 0755 /tmp/llama/build/bin/llama-quantize /opt/venv/bin/llama-quantize \
 && rm -rf /tmp/llama

# Now medft itself; --no-deps because every dependency is already installed from the pinned set above.
COPY job/ job/
COPY registry/ registry/
RUN pip install --no-deps --force-reinstall -c constraints.txt . \
 && medft --version

# ---------------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}

ARG VERSION=0.0.0
ARG REVISION=unknown
ARG SOURCE=unknown

LABEL org.opencontainers.image.title="medft" \
      org.opencontainers.image.description="Fine-tune DeepSeek-R1-Distill models into medical reasoning assistants as one batch job" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

# Runtime packages only. gcc, libc6-dev and python3-dev stay because Triton (used by torch.compile and
# unsloth's kernels) compiles a small C launcher against Python.h the first time each kernel runs and
# fails with "Failed to find C compiler" without them; no C++ compiler, make or build caches come along.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev python3 python3-dev \
 && rm -rf /var/lib/apt/lists/*

# A fixed, non-root UID/GID so Kubernetes' runAsUser/fsGroup and volume ownership can name it.
RUN groupadd --system --gid 10001 medft \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/medft/home --shell /usr/sbin/nologin medft

COPY --from=build /opt/venv /opt/venv
# The reference configs, so `--config /app/configs/<name>.yaml` works without mounting anything.
COPY configs/ /app/configs/

# Every path anything writes to lives under /var/lib/medft, the one volume, so the root filesystem can be
# read-only. Libraries create their own sub-directories there on first use; TMPDIR is the exception (its
# users expect it to exist), which is why the image creates the skeleton: `docker run -v NAME:/var/lib/medft`
# copies it into a new named volume, and the Kubernetes manifests mount a sub-path for tmp/.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/medft/home \
    TMPDIR=/var/lib/medft/tmp \
    XDG_CACHE_HOME=/var/lib/medft/cache \
    MEDFT_CACHE=/var/lib/medft/cache/medft \
    HF_HOME=/var/lib/medft/cache/huggingface \
    TRITON_CACHE_DIR=/var/lib/medft/cache/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/lib/medft/cache/torchinductor \
    UNSLOTH_COMPILE_LOCATION=/var/lib/medft/cache/unsloth_compiled_cache \
    CUDA_CACHE_PATH=/var/lib/medft/cache/nv \
    CC=gcc \
    UNSLOTH_DISABLE_STATISTICS=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MEDFT_IMAGE="medft:${VERSION} (${REVISION})" \
    HF_HUB_OFFLINE=0

# HF_HUB_OFFLINE=0: weights and data are downloaded from the Hugging Face Hub (HF_TOKEN for gated repos).
# Set it to 1 when everything is already in HF_HOME or comes from s3:// so that no request leaves the pod.

RUN mkdir -p /var/lib/medft/home /var/lib/medft/tmp /var/lib/medft/cache \
 && chown -R 10001:10001 /var/lib/medft \
 && chmod 0750 /var/lib/medft

VOLUME ["/var/lib/medft"]
# unsloth writes unsloth_compiled_cache/ into the working directory unless told otherwise: keep the
# working directory on the volume too, and a relative output.store (./medft-store) with it.
WORKDIR /var/lib/medft
USER 10001:10001

ENTRYPOINT ["medft"]
CMD ["train"]
