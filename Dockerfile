# selfheal: TorchServe serving a self-healing model.
#   make setup archive && docker build -t selfheal . && \
#   docker run -p 8080-8082:8080-8082 -v selfheal-data:/home/model-server/data selfheal
# `make setup` builds the feedback endpoint plugin (build/plugins/*.jar, javac against the
# SDK in the torchserve wheel); the image copies it like the .mar.
# bookworm: the last Debian release that packages the Java 17 JRE TorchServe 0.12 needs.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# Restricted networks (all default to nothing, so a plain `docker build .` is
# unaffected): PIP_CA_BUNDLE names a CA bundle mounted into the build, for TLS
# through a proxy; WHEEL_DIR a mounted directory of local wheels (e.g. the CPU
# build of torch); TORCH_INDEX_URL an extra index, e.g.
# https://download.pytorch.org/whl/cpu for a CPU-only image elsewhere.
ARG PIP_CA_BUNDLE=""
ARG WHEEL_DIR=""
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/selfheal
COPY pyproject.toml README.md ./
COPY selfheal_core ./selfheal_core
COPY selfheal_serving ./selfheal_serving
COPY selfheal_torchserve ./selfheal_torchserve
# the KServe and Ray Serve adapters are packaged too; their servers come with the extras, not in this image
COPY selfheal_kserve ./selfheal_kserve
COPY selfheal_ray ./selfheal_ray
COPY selfheal_bench ./selfheal_bench
# Exported as pip's own variables only when set: pip would read an empty one as a setting.
RUN if [ -n "$PIP_CA_BUNDLE" ]; then export PIP_CERT="$PIP_CA_BUNDLE"; fi \
 && if [ -n "$WHEEL_DIR" ]; then export PIP_FIND_LINKS="$WHEEL_DIR"; fi \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install "torch==${TORCH_VERSION}" "torchserve==0.12.0" "torch-model-archiver==0.12.0" ".[torchserve,postgres]" \
 && python -c "import selfheal_core, selfheal_serving.runtime, selfheal_torchserve.handler, ts, yaml, psycopg"

# selfheal's gauges declared for TorchServe's Prometheus export (metrics_config in config.properties).
RUN useradd --create-home --uid 1000 model-server \
 && mkdir -p /home/model-server/model-store /home/model-server/data \
 && cp "$(selfheal paths | sed -n 's/^metrics_config=//p')" /home/model-server/metrics.yaml \
 && chown -R model-server /home/model-server
COPY docker/config.properties docker/healthcheck.py docker/entrypoint.py /home/model-server/
COPY model_store/digits.mar /home/model-server/model-store/
COPY build/plugins/selfheal-feedback.jar /home/model-server/plugins/

USER model-server
WORKDIR /home/model-server
# Snapshots, the feedback log and the prediction record live on the volume and outlive the container.
ENV SELFHEAL_SNAPSHOT_DIR=/home/model-server/data/snapshots TEMP=/home/model-server/tmp
VOLUME ["/home/model-server/data"]
EXPOSE 8080 8081 8082
HEALTHCHECK --interval=10s --timeout=6s --start-period=60s --retries=3 CMD ["python", "/home/model-server/healthcheck.py"]
# TorchServe in the foreground; `docker stop` (SIGTERM) stops Java and the workers gracefully.
CMD ["python", "/home/model-server/entrypoint.py"]
