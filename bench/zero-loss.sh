#!/usr/bin/env bash
# Zero-loss rollouts (BENCHMARKS.md, "Zero-loss rollouts"): the same load
# generator against
#   kiln    20 consecutive rollouts of examples/hello (3 replicas behind
#           kiln's route; 7 rolling, 7 blue-green, 6 canary), each replacing
#           every instance, with 2 s requests in flight at every switch;
#   peer    the same image run by `docker compose` (one container publishing
#           a port, no proxy), recreated 20 times with
#           `docker compose up -d --force-recreate` after changing an env var
#           (`docker-compose` v1 when the v2 plugin is missing; when neither
#           is installed the test emulates compose's recreate with docker
#           stop + rm + run on the same port and says so).
# The load (crates/kiln/tests/zero_loss/load.rs, std only): 4 keep-alive
# clients and 2 new-connection clients looping `GET /`, 3 clients looping
# `GET /slow?ms=2000`. Both runs print a `ZERO-LOSS ...` line with the
# requests sent and the failures by kind.
#
# Needs root (kiln's sandbox driver) and docker for the peer. Takes about
# 2 min (kiln) + 4-5 min (peer: docker stops a container that ignores
# SIGTERM after 10 s).
#
#   bench/zero-loss.sh            # both
#   bench/zero-loss.sh kiln       # only kiln (this is also a normal test)
#   bench/zero-loss.sh peer       # only the docker compose peer
set -euo pipefail
cd "$(dirname "$0")/.."

what=${1:-all}
case "$what" in
  kiln) filter=(twenty_rollouts_under_load_lose_no_request --exact) ;;
  peer) filter=(docker_compose_peer_under_the_same_load --exact --ignored) ;;
  all) filter=(--include-ignored) ;;
  *) echo "usage: $0 [kiln|peer|all]" >&2; exit 2 ;;
esac

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
KILN_STRICT_TESTS=true cargo test --release -p kiln --test zero_loss -- \
  "${filter[@]}" --nocapture --test-threads=1 2>&1 | tee "$log" || status=$?
echo
echo "== summary"
grep -E '^ZERO-LOSS' "$log" || echo "(no ZERO-LOSS line: see the output above)"
exit "$status"
