#!/usr/bin/env bash
# The engine's figures (BENCHMARKS.md, "Engine"), each side by side with
# Docker doing the same work on the same image, through the kiln binary
# (release build) and its daemon, sandbox driver.
#
#   bench/engine.sh crash   # crash -> replacement healthy, median of RUNS (20)
#   bench/engine.sh apply   # `kiln apply` -> new generation serving, 1 and 10
#                           # instances, first / rolling / blue-green, median of APPLY_RUNS (5)
#   bench/engine.sh idle    # daemon CPU + RSS with IDLE_N (1000) idle instances
#                           # (busybox sleep, no check; then hello with an http
#                           # check, IDLE_HEALTH_N); docker: DOCKER_IDLE_N (100)
#   bench/engine.sh all     # the three, in that order
#
# What is measured (details in bench/engine.py):
#   crash  kill -9 of the instance's pid -> the replacement's
#          `instance.healthy` event (and -> the route answering 200 again);
#          docker: `docker run --restart=always --network host`, kill -9 of
#          .State.Pid -> the port answering 200 again (polled every 1 ms).
#          Both also net of the app's own start: the hello binary run on the
#          host, exec -> first accepted connection, median.
#          Kills are 11 s apart: kiln and docker both count a death within
#          10 s of the start toward their crash-loop backoff.
#   apply  wall time of `kiln apply -y` after a config change (env), minus
#          the await-healthy steps of the engine's journal; images are built
#          before. the peer is a loop (docker compose is optional on Debian; bench/zero-loss.sh uses it when present)
#          of `docker run -d` (and `docker rm -f` first, to replace).
#   idle   /proc/PID/status VmRSS and utime+stime over IDLE_SECONDS (60) of
#          the daemon, its supervisors (its children) and the instances;
#          docker: dockerd + containerd + containerd-shim* (RSS, CPU).
# Set DOCKER=0 to skip the docker side. As root (the sandbox driver), with
# python3, docker (dockerd is started if it does not answer) and
# /bin/busybox (busybox-static).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WHAT=${1:-all}
case $WHAT in crash | apply | idle | all) ;; *)
  echo "usage: bench/engine.sh crash|apply|idle|all" >&2
  exit 2
  ;;
esac

echo "== building kiln and hello (release)" >&2
cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" -p kiln -p hello
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export KILN="$TARGET/release/kiln" HELLO="$TARGET/release/hello"
export BUSYBOX=${BUSYBOX:-/bin/busybox}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-engine-bench.XXXXXX")
export WORK
cleanup() {
  # Whatever a failed run left: every daemon of the work dir, then the dir.
  for d in "$WORK"/*/; do
    [ -S "$d.kiln/kiln.sock" ] && "$KILN" down "$d" >/dev/null 2>&1 || true
  done
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    ids=$(docker ps -aq --filter name=kiln-bench-)
    [ -n "$ids" ] && docker rm -f $ids >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "${DOCKER:-1}" != 0 ]; then
  if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null; then
      echo "== starting dockerd (log: ${TMPDIR:-/tmp}/kiln-bench-dockerd.log)" >&2
      nohup dockerd >"${TMPDIR:-/tmp}/kiln-bench-dockerd.log" 2>&1 &
      for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
    docker info >/dev/null 2>&1 || { echo "docker does not answer: DOCKER=0 to skip it" >&2; exit 1; }
  fi
fi

echo "== $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg); work dir $WORK" >&2
python3 "$ROOT/bench/engine.py" "$WHAT"
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
