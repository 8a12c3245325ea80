#!/usr/bin/env bash
# `make docker-test`: build the CPU image (docker/Dockerfile) with podman, without a daemon or an image registry,
# and check that `zhllama chat` answers and `zhllama serve` answers GET /health inside it.
#
# - Base image: a Debian bookworm made here by debootstrap and imported into podman (the tarball is cached in
#   ~/.cache/zhllama/docker, the image is kept), unless ZHLLAMA_DOCKER_BASE names an image podman already has.
# - Wheels: the llama-cpp-python wheel `make setup` cached in ~/.cache/zhllama/wheels, and a CPU torch wheel if
#   this machine's pip has one without the network, go to docker/wheels/, which the Dockerfile installs first.
#   Without them the image compiles llama-cpp-python and takes torch from PyTorch's CPU index.
# - Runs: `podman build --isolation chroot`, then `buildah run --isolation chroot`, which shares the host's
#   network: the server inside answers on 127.0.0.1 here. (`podman run` is not used: it needs cgroups/rlimits
#   that sandboxes often refuse.)
# Exit 0 with "SKIP: reason" where no engine can build; non-zero with "FAIL: ..." when something ran and failed.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
say() { echo "docker-test: $*"; }
skip() { say "SKIP: $*"; exit 0; }
fail() { say "FAIL: $*" >&2; exit 1; }

CACHE=${ZHLLAMA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zhllama}
WHEELS=${ZHLLAMA_WHEELS:-$CACHE/wheels/$(sh scripts/cpu-tag.sh)}  # built for this CPU: see scripts/cpu-tag.sh
IMAGE=${ZHLLAMA_DOCKER_IMAGE:-localhost/zhllama:cpu}
BASE=${ZHLLAMA_DOCKER_BASE:-localhost/zhllama-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BUILD_TIMEOUT=${ZHLLAMA_DOCKER_BUILD_TIMEOUT:-3600}
ISO=(--isolation chroot)

# 1. An engine that can build here.
command -v podman >/dev/null || skip "podman is not installed (Debian: apt-get install podman buildah debootstrap)"
command -v buildah >/dev/null || skip "buildah is not installed (Debian: apt-get install podman buildah debootstrap)"
[ "$(id -u)" = 0 ] || skip "needs root: podman/buildah with --isolation chroot (and debootstrap) run as root here"
info_err=$(podman info 2>&1 >/dev/null) || skip "podman cannot run here: ${info_err##*$'\n'}"

# 2. The base image, from Debian packages (no registry needed).
if ! podman image exists "$BASE"; then
  [ -z "${ZHLLAMA_DOCKER_BASE:-}" ] || fail "ZHLLAMA_DOCKER_BASE=$BASE is not an image podman has"
  tarball=$CACHE/docker/debian-bookworm-minbase.tar
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null || skip "no base image and no debootstrap to make one (apt-get install debootstrap)"
    say "making the base image with debootstrap from $MIRROR (about 1-2 min)"
    rootfs=$CACHE/docker/rootfs.tmp
    rm -rf "$rootfs" && mkdir -p "$rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/docker/debootstrap.log" 2>&1 ||
      fail "debootstrap failed, see $CACHE/docker/debootstrap.log"
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
      "$MIRROR" "$MIRROR" "$SECURITY_MIRROR" >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  podman import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' "$tarball" "$BASE" >/dev/null || fail "podman import of $tarball failed"
fi

# 3. Wheels the image installs before any index.
mkdir -p docker/wheels
llama_version=$(sed -n 's/^LLAMA_CPP_VERSION=//p' scripts/setup.sh)
torch_version=$(sed -n 's/^TORCH_VERSION=//p' scripts/setup.sh)
found=no
for whl in "$WHEELS"/llama_cpp_python-"$llama_version"-*.whl; do
  [ -f "$whl" ] || continue
  cmp -s "$whl" "docker/wheels/${whl##*/}" || cp -f "$whl" docker/wheels/
  found=yes
done
[ $found = yes ] || say "note: no cached llama-cpp-python $llama_version wheel in $WHEELS (make setup caches it):" \
  "the image compiles it (about 5 min more)"
torch_index=https://download.pytorch.org/whl/cpu
hostpy=$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || true)
if [ -n "$hostpy" ] && "$hostpy" -m pip download -q --no-index --no-deps --only-binary=:all: -d docker/wheels \
     --implementation cp --python-version 3.11 --platform "manylinux_2_28_$(uname -m)" \
     "torch==$torch_version" >/dev/null 2>&1 && ls docker/wheels/torch-"$torch_version"+cpu-*.whl >/dev/null 2>&1; then
  torch_index=""   # the local CPU wheel (a higher version than PyPI's "$torch_version") wins over pip's own indexes
  say "using this machine's torch $torch_version+cpu wheel"
fi
rm -f docker/wheels/torch-"$torch_version"-*.whl   # never PyPI's CUDA-sized torch
# The Llama-2 vocabulary `make setup` cached (python -m zhllama.assets in the image then has nothing to fetch).
vocab=$CACHE/ggml-vocab-llama-spm.gguf
if [ -f "$vocab" ]; then cmp -s "$vocab" docker/wheels/${vocab##*/} || cp -f "$vocab" docker/wheels/; fi
# pip's CA bundle, where this machine's pip is told to use one (a TLS-intercepting proxy): the build's pip needs it too.
cert=${PIP_CERT:-$( [ -n "$hostpy" ] && "$hostpy" -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  cmp -s "$cert" docker/wheels/pip-ca.pem || cp -f "$cert" docker/wheels/pip-ca.pem
else
  rm -f docker/wheels/pip-ca.pem
fi

# 4. Build.
say "building $IMAGE from docker/Dockerfile on $BASE"
build_start=$SECONDS
timeout "$BUILD_TIMEOUT" podman build "${ISO[@]}" --force-rm -f docker/Dockerfile --build-arg BASE="$BASE" \
  --build-arg TORCH_INDEX_URL="$torch_index" -t "$IMAGE" . || fail "podman build failed (exit $?)"
say "built in $((SECONDS - build_start)) s"

# 5. Run zhllama inside: a tiny model on the real Llama-2 vocabulary, a chat turn, then the server.
ctr=$(buildah from --pull=never "$IMAGE")
server=""
tree() { local c; for c in $(ps -o pid= --ppid "$1" 2>/dev/null); do tree "$c"; done; echo "$1"; }
stop_server() {
  [ -n "$server" ] || return 0
  local pids; pids=$(tree "$server")
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 20); do kill -0 $pids 2>/dev/null || break; sleep 0.5; done
  kill -KILL $pids 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
}
log=$(mktemp)
cleanup() { stop_server; buildah rm "$ctr" >/dev/null 2>&1 || true; rm -f "$log" "$log.health"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
run() { local t=$1; shift; timeout "$t" buildah run "${ISO[@]}" "$ctr" -- "$@"; }

run 600 sh -c 'zhllama tokenizer from-gguf "$(python -m zhllama.assets)" --out /tmp/tok &&
  zhllama model init --preset tiny --tokenizer /tmp/tok --out /tmp/model' >"$log" 2>&1 ||
  { tail -20 "$log" >&2; fail "could not make a tiny model inside the image"; }
reply=$(printf '你好\n/exit\n' | run 300 zhllama chat --model /tmp/model --max-tokens 8 --seed 0 2>"$log") ||
  { tail -20 "$log" >&2; fail "zhllama chat failed inside the image"; }
reply=$(echo "$reply" | sed -n 's/^>>> //p' | head -1)
[ -n "$reply" ] || fail "zhllama chat inside the image gave no reply"
say "zhllama chat (tiny random model) replied: $reply"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
  echo 18765)
timeout 600 buildah run "${ISO[@]}" "$ctr" -- zhllama serve --model /tmp/model --port "$port" >"$log" 2>&1 &
server=$!
code=000
for _ in $(seq 300); do
  code=$(curl -s -o "$log.health" -w '%{http_code}' "http://127.0.0.1:$port/health" || true)
  [ "$code" = 200 ] && break
  kill -0 "$server" 2>/dev/null || break
  sleep 1
done
stop_server
if [ "$code" != 200 ]; then
  tail -20 "$log" >&2
  fail "GET http://127.0.0.1:$port/health from zhllama serve inside $IMAGE gave $code, not 200"
fi
say "zhllama serve inside $IMAGE: GET /health -> 200 $(cat "$log.health")"
! curl -s -o /dev/null "http://127.0.0.1:$port/health" || fail "the server on port $port still answers after being stopped"
say "OK in $((SECONDS - START)) s"
