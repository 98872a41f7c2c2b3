# syntax=docker/dockerfile:1
# keras-metalstm: a CPU image running `metalstm` (the package installed from this checkout).
#   docker build -t metalstm .                      python:3.11-slim-bookworm base
#   docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu -t metalstm:gpu .   any Debian/Ubuntu
#       base with python3 (>= 3.11) and python3-venv; a GPU base supplies CUDA, the package adds nothing GPU-specific
#   docker run --rm -v "$PWD/runs:/home/metalstm/runs" metalstm train --run-dir runs/demo
# scripts/docker-smoke.sh builds it with podman from a locally debootstrapped base (no registry needed).
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build stage: a virtual environment with the package and its dependencies --------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL=https://pypi.org/simple
# Behind a TLS-intercepting proxy: mount its CA bundle for the build and point PIP_CERT at it, e.g.
#   podman build -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.pem:ro --build-arg PIP_CERT=/run/host-ca.pem .
# (unset by default: nothing about the build machine ends up in the image)
ARG PIP_CERT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_INDEX_URL=${PIP_INDEX_URL}
WORKDIR /src
RUN python3 -m venv /opt/metalstm
COPY setup.py pyproject.toml README.md LICENSE NOTICE ./
COPY keras_metalstm ./keras_metalstm
COPY cli ./cli
# A regular (non-editable) install of the checkout; then drop the packaging tools from the environment.
RUN /opt/metalstm/bin/pip install . \
    && /opt/metalstm/bin/pip uninstall -y pip setuptools wheel

# ---- final stage: the same base, the environment, a non-root user; no compilers, no pip ---------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="keras-metalstm" \
      org.opencontainers.image.description="LSTM meta-learner (Ravi & Larochelle 2017) for few-shot learning: metalstm CLI"
COPY --from=build /opt/metalstm /opt/metalstm
RUN groupadd --gid 10001 metalstm \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin metalstm
# The fused CPU kernel is compiled per machine on first use and this image has no compiler: it runs the stock
# TensorFlow ops (same results; the CPU meta-training step is ~25% slower). GPU images use stock ops anyway.
ENV PATH=/opt/metalstm/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    KERAS_METALSTM_FUSED_KERNELS=0
USER 10001:10001
WORKDIR /home/metalstm
ENTRYPOINT ["metalstm"]
CMD ["--help"]
