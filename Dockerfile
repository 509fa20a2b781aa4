# localp2p: one image for the server (`localp2p run`) and the workers (`localp2p worker ...`).
#
#   docker build -t localp2p .
#   docker run --net host localp2p run --p2p
#   docker run --net host -e TOKEN=lp2p1.... localp2p worker p2p-llama-cpp-rpc
#
# The build stage runs scripts/install.sh, the same script as `make install` and CI.
# llama.cpp is built for a portable CPU (no -march=native): pass
#   --build-arg LOCALP2P_CMAKE_ARGS="-DGGML_NATIVE=ON"
# to build for the build machine's own CPU instead (faster, not portable).

# ---------------------------------------------------------------- build stage
FROM python:3.11-slim-bookworm AS build

# Debian stable's package versions change only with security and point releases, and
# the archive drops the old version when they do: an exact pin would break the build on
# the next point release. The base image tag already fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake libgmp-dev \
    && rm -rf /var/lib/apt/lists/*

ARG LOCALP2P_CMAKE_ARGS="-DGGML_NATIVE=OFF"
# The venv and the source live at the same fixed paths in both stages: install.sh makes
# an editable install, so the venv points at /opt/localp2p/src.
ENV VENV=/opt/localp2p/venv \
    PYTHON=python3 \
    LOCALP2P_EXTRAS= \
    LOCALP2P_CMAKE_ARGS=${LOCALP2P_CMAKE_ARGS} \
    LOCALP2P_WHEEL_CACHE=/tmp/localp2p-wheels \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/localp2p/src
COPY . /opt/localp2p/src
RUN bash scripts/install.sh && rm -rf /tmp/localp2p-wheels

# -------------------------------------------------------------- runtime stage
FROM python:3.11-slim-bookworm AS runtime

# libgomp1: llama.cpp's CPU backend uses OpenMP; libgmp10: fastecdsa (libp2p) links GMP.
# Not pinned, for the reason given in the build stage. The node-identity directory exists,
# owned by the user, so a named volume mounted there starts with that owner (Docker copies
# the image's directory into a fresh volume).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libgmp10 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 localp2p \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin localp2p \
    && install -d -o 10001 -g 10001 /home/localp2p/.local /home/localp2p/.local/state /home/localp2p/.local/state/localp2p

COPY --from=build /opt/localp2p /opt/localp2p

ENV PATH=/opt/localp2p/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# The numeric id of the user created above (a name may not resolve on the host).
USER 10001:10001
WORKDIR /home/localp2p

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"]

ENTRYPOINT ["localp2p"]
CMD ["run", "--address", "0.0.0.0:8080"]
