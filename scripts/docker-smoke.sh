#!/usr/bin/env bash
# Build the Dockerfile with podman and smoke-test the image: train a few episodes, evaluate, export, inside the
# container, as the image's non-root user. Works without any container registry:
#   * the base image is made locally: debootstrap --variant=minbase bookworm (+ python3, python3-venv) and
#     `podman import` (bookworm's python3 is 3.11, like the python:3.11-slim-bookworm default base);
#   * podman runs with --storage-driver overlay and scripts/containers.conf (runtime = "runc": crun fails on the
#     sandboxes' cgroup setup; default_ulimits lowered below the sandbox's own limits);
#   * the build needs PyPI (pip inside the build): `podman build --network host`.
# Needs root (debootstrap, podman's rootful storage) and: apt-get install -y podman debootstrap runc
#
# Usage: scripts/docker-smoke.sh            (env: BASE_DIR=/var/tmp/metalstm-base  IMAGE=localhost/metalstm:smoke
#                                                  MIRROR=http://deb.debian.org/debian  KEEP=1 keeps the image
#                                                  HOST_CA=CA bundle for pip behind a TLS proxy)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASE_DIR=${BASE_DIR:-/var/tmp/metalstm-base}
BASE_IMAGE=${BASE_IMAGE:-localhost/bookworm-python:minbase}
IMAGE=${IMAGE:-localhost/metalstm:smoke}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
export CONTAINERS_CONF="$ROOT/scripts/containers.conf"
PODMAN=(podman --storage-driver overlay)

step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

for tool in podman debootstrap runc; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y podman debootstrap runc" >&2; exit 2; }
done

if ! "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    step "base image $BASE_IMAGE: debootstrap --variant=minbase bookworm"
    if [ ! -x "$BASE_DIR/rootfs/usr/bin/python3" ]; then
        rm -rf "$BASE_DIR/rootfs"
        mkdir -p "$BASE_DIR"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$BASE_DIR/rootfs" "$MIRROR"
    fi
    rm -rf "$BASE_DIR/rootfs/var/cache/apt/archives/"*.deb "$BASE_DIR/rootfs/var/lib/apt/lists/"*
    tar -C "$BASE_DIR/rootfs" -c . | "${PODMAN[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE"
fi

step "build $IMAGE from $BASE_IMAGE"
BUILD=(--network host --build-arg "BASE_IMAGE=$BASE_IMAGE")
# The host's CA bundle (it trusts this machine's TLS-intercepting egress proxy), mounted for the build only.
HOST_CA=${HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$HOST_CA" ]; then
    BUILD+=(-v "$HOST_CA:/run/host-ca.pem:ro" --build-arg PIP_CERT=/run/host-ca.pem)
fi
"${PODMAN[@]}" build "${BUILD[@]}" -t "$IMAGE" -f Dockerfile .

run() { "${PODMAN[@]}" run --rm --network none "$@"; }

step "image checks: entrypoint, non-root user, no pip in the environment, no compilers"
run "$IMAGE" --version
test "$(run --entrypoint id "$IMAGE" -u)" = 10001
run --entrypoint sh "$IMAGE" -c \
    '! test -e /opt/metalstm/bin/pip && ! command -v gcc && ! command -v cc && ! command -v make' >/dev/null

step "train a few episodes, evaluate and export inside the container"
WORK=$(mktemp -d)
chmod 777 "$WORK"
trap 'rm -rf "$WORK"; [ -n "${KEEP:-}" ] || "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true' EXIT
TINY=(--dataset fontglot --n-way 2 --k-shot 1 --query 2 --inner-steps 2 --filters 8 --meta-batch 2 --episodes 4
      --val-episodes 2 --validate-every 4 --checkpoint-every 2 --log-every 2 --no-progress)
mrun() { run -v "$WORK:/work:rw" -w /work "$IMAGE" "$@"; }
mrun train "${TINY[@]}" --run-dir /work/run
test -f "$WORK/run/best.keras"
mrun train "${TINY[@]}" --episodes 6 --run-dir /work/run --resume  # resume inside the container
mrun evaluate /work/run --episodes 10 --json
mrun export /work/run --out /work/export
test -n "$(find "$WORK/export" -name saved_model.pb -print -quit)"
ls -R "$WORK/export" | head -20
step "train --strategy mirrored inside the container (1 CPU device: 1 replica)"
mrun train "${TINY[@]}" --strategy mirrored --run-dir /work/mirrored
test -f "$WORK/mirrored/best.keras"
if [ -n "${SMOKE_QUICKSTART:-}" ]; then  # the README's quickstart (slower: baselines pre-training)
    step "quickstart inside the container"
    mrun quickstart --out /work/qs --episodes 4 --eval-episodes 10 --pretrain-epochs 1 --no-progress
fi
step "docker smoke test passed"
