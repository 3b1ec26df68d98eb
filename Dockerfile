# syntax=docker/dockerfile:1.7
#
# DyCE Serve images. BuildKit builds only the stages the chosen target needs.
#
#   docker build -t dyce-serve .                                  # CPU, artefacts mounted at run time
#   docker build -t dyce-serve --build-arg ARTIFACTS_FROM=context .   # bake ./artifacts (dyce-offline build first)
#   docker build -t dyce-serve --build-arg ARTIFACTS_FROM=build .     # bake: run dyce-offline build in the image build
#   docker build -t dyce-serve:gpu --target gpu .                 # CUDA host: CUDA torch wheels + onnxruntime-gpu
#
# Every Python package comes from constraints.txt (the lock), so the images run the same
# torch==2.14.0 / torchvision==0.29.2 pair as CI.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CPU image takes torch/torchvision from PyTorch's CPU index: the same pinned versions
# (2.14.0+cpu satisfies ==2.14.0) without the ~3 GB of CUDA libraries PyPI's wheels pull in.
# Set it empty to use PyPI alone.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# volume: the runtime expects artefacts mounted at /srv/dyce/artifacts (compose, Kubernetes);
# context: copy ./artifacts from the build context; build: run `dyce-offline build` here.
ARG ARTIFACTS_FROM=volume

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------------
# Sources only; separate so the dependency layers below are not rebuilt on every code change.
FROM python-base AS source
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY dyce/ dyce/
COPY service/ service/
COPY offline/ offline/

# ---------------------------------------------------------------------------------------------
FROM python-base AS build-cpu
ARG TORCH_CPU_INDEX
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# Dependencies first (cached while pyproject/constraints do not change), then the project itself.
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
    > /tmp/requirements.txt
RUN pip install -c constraints.txt ${TORCH_CPU_INDEX:+--extra-index-url "$TORCH_CPU_INDEX"} -r /tmp/requirements.txt
COPY --from=source /src /src
RUN pip install --no-deps . && pip check

# ---------------------------------------------------------------------------------------------
FROM build-cpu AS build-gpu
# PyPI's torch wheels are the CUDA builds (their nvidia-* libraries are pinned in the lock);
# onnxruntime-gpu provides the same `onnxruntime` module, so it replaces the CPU package.
RUN pip uninstall -y torch torchvision onnxruntime \
    && pip install -c constraints.txt torch torchvision onnxruntime-gpu \
    && pip check

# ---------------------------------------------------------------------------------------------
# Where the runtime's /srv/dyce/artifacts comes from (ARTIFACTS_FROM).
FROM python-base AS artifacts-volume
RUN mkdir /artifacts

FROM python-base AS artifacts-context
# .dockerignore lets through only the five files the service reads.
COPY artifacts/ /artifacts/

FROM build-cpu AS artifacts-build
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
RUN dyce-offline --artifacts /work build \
    && mkdir /artifacts \
    && cp /work/backbone.json /work/backbone.safetensors /work/exits.json /work/exits.safetensors /work/bank.json \
       /artifacts/

FROM artifacts-${ARTIFACTS_FROM} AS artifacts

# ---------------------------------------------------------------------------------------------
FROM python-base AS runtime-base
ARG UID=10001
RUN groupadd --system --gid ${UID} dyce \
    && useradd --system --uid ${UID} --gid dyce --home-dir /home/dyce --create-home --shell /usr/sbin/nologin dyce
COPY --from=artifacts --chown=${UID}:${UID} /artifacts /srv/dyce/artifacts
WORKDIR /srv/dyce
# Caches and temporary files go to /tmp, the one writable path under a read-only root fs.
ENV DYCE_ARTIFACTS_DIR=/srv/dyce/artifacts \
    DYCE_HOST=0.0.0.0 \
    DYCE_PORT=8000 \
    HOME=/home/dyce \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
USER ${UID}:${UID}
EXPOSE 8000
# Ready, not merely live: a container that has not loaded and warmed the model is not healthy.
# Python instead of curl: the slim image has no curl, and this adds nothing to it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = f\"http://127.0.0.1:{os.environ.get('DYCE_PORT', '8000')}/v2/health/ready\"; sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]
ENTRYPOINT ["dyce-serve"]

# ---------------------------------------------------------------------------------------------
FROM runtime-base AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
ENV DYCE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# The default target (last stage): the CPU image.
FROM runtime-base AS runtime
COPY --from=build-cpu /opt/venv /opt/venv
ENV DYCE_DEVICE=cpu
