#!/usr/bin/env bash
# Build the Docker image with podman and check it for real (make docker-test, .ci/run).
#
# No Docker engine runs on these machines and no registry is reachable, so:
# podman (runc runtime, cgroupfs, no default ulimits) builds and runs the image,
# and the base image is a stand-in made from Debian bookworm packages
# (python3, python3-venv) with debootstrap, cached as localhost/selfheal-base:bookworm.
# It stops and removes only the containers, volume and image it created; the base
# image and podman's layer cache are kept so that the next run is quick.
# podman's complaints about missing systemd (health-check timers) go to build/docker/podman.log.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$REPO/build/docker
BASE=localhost/selfheal-base:bookworm
RUN_ID=$$
TAG=localhost/selfheal:test-$RUN_ID
VOLUME=selfheal-test-$RUN_ID
PY=$REPO/.venv/bin/python
log() { echo "[docker-test $(date +%T)] $*"; }
start=$(date +%s)
mkdir -p "$WORK"

missing=()
for tool in podman debootstrap runc; do command -v $tool >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cat > "$WORK/containers.conf" <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF=$WORK/containers.conf

containers=()
cleanup() {
  for c in "${containers[@]+"${containers[@]}"}"; do podman rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
  podman volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  podman rmi -f "$TAG" >/dev/null 2>&1 || true
}
trap cleanup EXIT

if ! podman image exists "$BASE"; then
  log "building the stand-in base image $BASE with debootstrap (once; cached)"
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

make --no-print-directory archive >"$WORK/archive.log" 2>&1 || { tail -20 "$WORK/archive.log"; exit 1; }  # always current: the image copies it

# Restricted-network build arguments: the CA bundle and local wheel directory pip uses here.
pip_setting() {  # the value `pip config list` shows for a key (cert, find-links), from any scope
  $PY -m pip config list 2>/dev/null | sed -n "s/^[^=]*\.$1='\(.*\)'$/\1/p" | head -n 1
}
ca=$(pip_setting cert)
wheels=$(pip_setting find-links)
log "pip CA bundle: ${ca:-none}; local wheels: ${wheels:-none}"
build_args=(--build-arg "BASE_IMAGE=$BASE")
[ -n "$ca" ] && [ -f "$ca" ] && build_args+=(-v "$ca:/run/selfheal/ca.crt:ro" --build-arg PIP_CA_BUNDLE=/run/selfheal/ca.crt)
[ -n "$wheels" ] && [ -d "$wheels" ] && build_args+=(-v "$wheels:/run/selfheal/wheels:ro" --build-arg WHEEL_DIR=/run/selfheal/wheels)
log "building $TAG"
build_start=$(date +%s)
podman build --format docker --network host "${build_args[@]}" -t "$TAG" . >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log"; exit 1; }
build_s=$(( $(date +%s) - build_start ))

# Loopback addresses and free ports: the container shares the host network.
read -r p1 p2 p3 p4 p5 < <($PY -c "from selfheal_bench.torchserve import free_ports; print(*free_ports(5))")
sed -e "s#0.0.0.0:8080#127.0.0.1:$p1#; s#0.0.0.0:8081#127.0.0.1:$p2#; s#0.0.0.0:8082#127.0.0.1:$p3#" \
    -e "s#grpc_inference_port=7070#grpc_inference_port=$p4#; s#grpc_management_port=7071#grpc_management_port=$p5#" \
    docker/config.properties >"$WORK/config.properties"
podman volume create "$VOLUME" >/dev/null

run_container() {  # name
  containers+=("$1")
  # No systemd here to time health checks: --health-interval=disable keeps the image's
  # HEALTHCHECK, which healthy() below runs on demand with `podman healthcheck run`.
  podman run -d --name "$1" --health-interval=disable --network host -v "$VOLUME:/home/model-server/data" \
    -v "$WORK/config.properties:/home/model-server/config.properties:ro" "$TAG" >/dev/null 2>>"$WORK/podman.log"
  for _ in $(seq 120); do
    podman exec "$1" test -s /home/model-server/key_file.json 2>/dev/null && break
    sleep 1
  done
}
check() {  # name phase [args]
  local name=$1; shift
  $PY scripts/docker_check.py "$@" --inference "http://127.0.0.1:$p1" --management "http://127.0.0.1:$p2" \
    --metrics "http://127.0.0.1:$p3" \
    --keys "$(podman exec "$name" cat /home/model-server/key_file.json)" \
    || { podman logs "$name" 2>&1 | tail -60 >&2; exit 1; }
}
healthy() {  # name: the image's own HEALTHCHECK, run by podman
  for _ in $(seq 60); do podman healthcheck run "$1" >/dev/null 2>&1 && return 0; sleep 2; done
  podman logs "$1" 2>&1 | tail -30; return 1
}
clean_stop() {  # name: SIGTERM, graceful exit 0 well before the kill timeout
  local t0=$(date +%s)
  podman stop -t 30 "$1" >/dev/null 2>>"$WORK/podman.log"
  local took=$(( $(date +%s) - t0 )) code
  code=$(podman inspect "$1" --format '{{.State.ExitCode}}')
  [ "$code" = 0 ] && [ "$took" -lt 30 ] || { log "unclean stop: exit $code after ${took}s"; exit 1; }
  log "stopped $1 cleanly in ${took}s"
}

log "first container"
run_container selfheal-test-$RUN_ID-a
healthy selfheal-test-$RUN_ID-a
first=$(check selfheal-test-$RUN_ID-a first)
version=$($PY -c "import json,sys; print(json.loads(sys.argv[1])['version'])" "$first")
log "ping healthy, prediction served, feedback published snapshot version $version"
clean_stop selfheal-test-$RUN_ID-a

log "second container on the same volume"
run_container selfheal-test-$RUN_ID-b
healthy selfheal-test-$RUN_ID-b
check selfheal-test-$RUN_ID-b restarted --expect-version "$version" >/dev/null
log "restarted container serves snapshot version $version"
clean_stop selfheal-test-$RUN_ID-b

size=$(podman image inspect "$TAG" --format '{{.Size}}')
total=$(( $(date +%s) - start ))
log "image size $((size / 1024 / 1024)) MiB, build ${build_s}s, docker test ${total}s in all"
echo "docker test passed"
