#!/usr/bin/env bash
# Makes sure a Docker daemon answers (`docker info`): installs the Debian
# package docker.io when `docker` or `dockerd` is missing, and starts
# `dockerd --storage-driver=vfs` in the background when no daemon answers
# (vfs: works inside a container or VM without overlayfs; slow for big
# images, and thaw's is small). `make image` and the image test call it, so
# CI sets itself up. Exits non-zero, saying what to do, when it cannot.
#
# Env: DOCKERD_LOG (default /tmp/thaw-dockerd.log).
set -euo pipefail
log="${DOCKERD_LOG:-/tmp/thaw-dockerd.log}"
answers() { timeout 10 docker info >/dev/null 2>&1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v docker >/dev/null || ! command -v dockerd >/dev/null; then
  if command -v docker >/dev/null && answers; then
    echo "docker: a daemon answers (no local dockerd needed)"; exit 0
  fi
  echo "docker: installing docker.io (Debian package)" >&2
  if ! { as_root apt-get install -y -q docker.io >/dev/null \
         || { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q docker.io >/dev/null; }; }; then
    echo "docker: could not install docker.io; install Docker (apt-get install docker.io) and start its daemon" >&2
    exit 1
  fi
fi

if answers; then echo "docker: daemon answering"; exit 0; fi

echo "docker: no daemon answers; starting dockerd --storage-driver=vfs (log: $log)" >&2
# setsid: the daemon outlives this script and make's process group.
as_root setsid dockerd --storage-driver=vfs >"$log" 2>&1 < /dev/null &
for _ in $(seq 120); do
  if answers; then echo "docker: dockerd started"; exit 0; fi
  sleep 0.5
done
echo "docker: dockerd did not answer within 60 s; its log ($log) ends:" >&2
tail -n 20 "$log" >&2 || true
echo "start a Docker daemon (e.g. dockerd --storage-driver=vfs &) and rerun" >&2
exit 1
