#!/usr/bin/env bash
# wrk against kiln's proxy, nginx and HAProxy, in front of the same backend
# on loopback, with the same CPU budget, in one run; prints requests/s and
# p50/p99 latency side by side, medians of RUNS runs, and ratios vs nginx.
#
#   bench/proxy.sh          # RUNS=3 DURATION=10 CONNS=64 PIN=1
#   RUNS=5 DURATION=20 CONNS=16 bench/proxy.sh
#   KILN_BIN=/path/to/proxy_bench TARGETS="nginx kiln" bench/proxy.sh
#                           # another build of the example (a patch under test)
#
# Setup (everything on 127.0.0.1, own config files in a temp dir, all in
# the foreground, stopped on exit; the Debian services are not used):
#   backend   nginx, 1 worker, serving two static files: /small (SMALL_BYTES,
#             default 128 bytes) and /64k (65,536 bytes); keep-alive,
#             access log off. The same backend behind every proxy.
#   nginx     worker_processes 1; upstream keepalive 256 +
#             proxy_http_version 1.1 + proxy_set_header Connection "";
#             sets X-Forwarded-For (as kiln does); buffering as shipped.
#   haproxy   nbthread 1, mode http, http-reuse always, option forwardfor.
#   kiln      crates/kiln-proxy/examples/proxy_bench.rs, 1 proxy worker
#             thread (`--threads 1`: one current-thread tokio runtime that
#             accepts and serves, as each of the daemon's proxy workers does).
#   direct    wrk straight at the backend (no proxy), for reference.
# Columns: medians over the runs of req/s, p50, p99 (wrk --latency) and the
# proxy's CPU µs per request; non-2xx answers and wrk's socket errors
# (connect/read/write/timeout: a read error is a connection the proxy
# closed under a request) are summed over the runs.
# keepalive_requests is raised on every nginx (default 1000 would reconnect
# client and upstream connections every 1000 requests; kiln and haproxy do
# not), so all proxies keep their connections for the whole run.
#
# CPU budget (PIN=1, the default, needs 2 cores): the proxy under test runs
# alone on CPU PROXY_CPU (default 1), wrk (1 thread) and the backend share
# CPU CLIENT_CPU (default 0), via taskset. The proxy's CPU time per request
# (utime+stime from /proc, µs) is printed too: it does not depend on whether
# the proxy or the client side was the bottleneck.
#
# Order: each run measures every body × target, interleaved (run 1 of all,
# then run 2 of all, ...), so drifting noise hits every target alike; the
# load average is printed before and after.
# Needs: nginx, haproxy, wrk (Debian: apt-get install nginx haproxy wrk),
# python3, curl, taskset (util-linux). Measured as root.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
PIN=${PIN:-1}
PROXY_CPU=${PROXY_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
SMALL_BYTES=${SMALL_BYTES:-128}
BASE_PORT=${BASE_PORT:-18080}
KILN_FLAGS=${KILN_FLAGS:-}
TARGETS=${TARGETS:-"direct nginx haproxy kiln"}
BODIES=${BODIES:-"small 64k"}

BACKEND_PORT=$((BASE_PORT + 1))
declare -A PORT=([kiln]=$BASE_PORT [direct]=$BACKEND_PORT [nginx]=$((BASE_PORT + 2)) [haproxy]=$((BASE_PORT + 3)))

for tool in nginx haproxy wrk python3 curl taskset; do
  command -v "$tool" >/dev/null || { echo "needs $tool (Debian: apt-get install -y nginx haproxy wrk)" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-proxy-bench.XXXXXX")
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -n "${KILN_BIN:-}" ]; then
  KILN=$KILN_BIN
else
  echo "== building kiln's proxy (release)" >&2
  cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" -p kiln-proxy --example proxy_bench
  KILN="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/proxy_bench"
fi

pin() { # cpu cmd... (exec: started with &, $! is the command's own pid)
  local cpu=$1; shift
  if [ "$PIN" = 1 ]; then exec taskset -c "$cpu" "$@"; else exec "$@"; fi
}

# Static files of the backend.
mkdir -p "$WORK/www"
python3 - "$WORK/www" "$SMALL_BYTES" <<'PY'
import os, sys
root, small = sys.argv[1], int(sys.argv[2])
line = b"kiln proxy benchmark body, the same bytes for every request.\n"
for name, size in (("small", small), ("64k", 65536)):
    with open(os.path.join(root, name), "wb") as f:
        f.write((line * (size // len(line) + 1))[:size])
PY

# nginx settings shared by the backend and the nginx proxy. As root, the
# workers stay root so they can use the temp dir.
nginx_common() { # name
  local d="$WORK/$1"
  mkdir -p "$d"
  cat <<EOF
$([ "$(id -u)" = 0 ] && echo "user root root;")
daemon off;
master_process on;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() { # name
  local d="$WORK/$1"
  cat <<EOF
  access_log off;
  client_body_temp_path $d/client_body;
  proxy_temp_path $d/proxy;
  fastcgi_temp_path $d/fastcgi;
  uwsgi_temp_path $d/uwsgi;
  scgi_temp_path $d/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
EOF
}

{
  nginx_common backend
  echo "http {"
  nginx_http_common backend
  cat <<EOF
  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  tcp_nodelay on;
  open_file_cache max=16 inactive=1h;
  open_file_cache_valid 1h;
  server {
    listen 127.0.0.1:$BACKEND_PORT reuseport backlog=4096;
    root $WORK/www;
  }
}
EOF
} >"$WORK/backend.conf"

{
  nginx_common nginx
  echo "http {"
  nginx_http_common nginx
  cat <<EOF
  upstream backend {
    server 127.0.0.1:$BACKEND_PORT;
    keepalive 256;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:${PORT[nginx]} backlog=4096;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    }
  }
}
EOF
} >"$WORK/nginx.conf"

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn 4096
  pidfile $WORK/haproxy.pid
defaults
  mode http
  option http-keep-alive
  option forwardfor
  http-reuse always
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:${PORT[haproxy]}
  default_backend be
backend be
  server s1 127.0.0.1:$BACKEND_PORT maxconn 4096
EOF

wait_port() { # port log
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1; $2:" >&2
  cat "$2" >&2
  exit 1
}

echo "== starting the backend and the three proxies" >&2
pin "$CLIENT_CPU" nginx -c "$WORK/backend.conf" -p "$WORK/backend" >"$WORK/backend.out" 2>&1 &
PIDS+=($!)
wait_port "$BACKEND_PORT" "$WORK/backend.out"
pin "$PROXY_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK/nginx" >"$WORK/nginx.out" 2>&1 &
PIDS+=($!); NGINX_MASTER=$!
pin "$PROXY_CPU" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.out" 2>&1 &
PIDS+=($!); HAPROXY_PID=$!
# shellcheck disable=SC2086 # KILN_FLAGS is a list of flags
pin "$PROXY_CPU" "$KILN" --listen "127.0.0.1:${PORT[kiln]}" --backend "127.0.0.1:$BACKEND_PORT" --threads 1 $KILN_FLAGS >"$WORK/kiln.out" 2>&1 &
PIDS+=($!); KILN_PID=$!
for t in nginx haproxy kiln; do wait_port "${PORT[$t]}" "$WORK/$t.out"; done

# The process whose CPU time counts as the proxy's (nginx: its one worker;
# the master does nothing per request).
proxy_pid() { # target
  case $1 in
    kiln) echo "$KILN_PID" ;;
    haproxy) echo "$HAPROXY_PID" ;;
    nginx) pgrep -P "$NGINX_MASTER" | head -1 ;;
    direct) echo "" ;;
  esac
}
cpu_ticks() { # pid -> utime+stime in clock ticks (all threads)
  [ -n "$1" ] || { echo 0; return; }
  awk '{ print $14 + $15 }' "/proc/$1/stat"
}
HZ=$(getconf CLK_TCK)

for body in $BODIES; do
  for t in $TARGETS; do
    out=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' "http://127.0.0.1:${PORT[$t]}/$body" 2>/dev/null || true)
    if [ -n "$out" ] && [ "${out%% *}" != 200 ]; then echo "$t /$body answered $out" >&2; exit 1; fi
    # Warm-up: connections, pools, caches.
    (pin "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:${PORT[$t]}/$body") >/dev/null
  done
done

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for run in $(seq "$RUNS"); do
  for body in $BODIES; do
    for t in $TARGETS; do
      pid=$(proxy_pid "$t")
      c0=$(cpu_ticks "$pid")
      (pin "$CLIENT_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:${PORT[$t]}/$body") >"$WORK/wrk.out"
      c1=$(cpu_ticks "$pid")
      line=$(python3 - "$WORK/wrk.out" "$t" "$body" "$run" "$((c1 - c0))" "$HZ" "$(cut -d' ' -f1 /proc/loadavg)" <<'PY'
import re, sys
path, target, body, run, ticks, hz, load = sys.argv[1:]
text = open(path).read()
def ms(v, unit):
    return float(v) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]
lat = {p: ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)}
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
total = int(re.search(r"(\d+) requests in", text).group(1))
m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
bad = int(m.group(1)) if m else 0
m = re.search(r"Socket errors: (.*)", text)
errors = sum(int(n) for n in re.findall(r"\d+", m.group(1))) if m else 0
cpu_us = int(ticks) / int(hz) * 1e6 / total if target != "direct" else 0.0
print(f"{run}\t{body}\t{target}\t{rps:.0f}\t{lat['50']:.3f}\t{lat['99']:.3f}\t{cpu_us:.1f}\t{bad}\t{load}\t{errors}")
PY
)
      echo "$line" >>"$RESULTS"
      echo "   $line" >&2
    done
  done
done
echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
grep -h -i -E 'warn|error|crit|emerg|alert' "$WORK"/backend/error.log "$WORK"/nginx/error.log \
  "$WORK"/backend.out "$WORK"/nginx.out "$WORK"/haproxy.out "$WORK"/kiln.out 2>/dev/null | sed 's/^/   log: /' >&2 || true

echo
echo "$RUNS runs of ${DURATION}s each; wrk -t1 -c$CONNS; $(nproc) cores; $(uname -r); pinned: $([ "$PIN" = 1 ] && echo "proxy on CPU $PROXY_CPU, wrk + backend on CPU $CLIENT_CPU" || echo no)"
echo "nginx $(nginx -v 2>&1 | sed 's|.*/||'), haproxy $(haproxy -v | head -1 | awk '{print $3}'), wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'), kiln $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)"
python3 - "$RESULTS" "$BODIES" "$TARGETS" <<'PY'
import statistics as st, sys
path, bodies, targets = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
med = {}
for body in bodies:
    for t in targets:
        rs = [r for r in rows if r[1] == body and r[2] == t]
        if rs:
            med[body, t] = [st.median(float(r[i]) for r in rs) for i in (3, 4, 5, 6)] + [sum(int(r[7]) for r in rs), sum(int(r[9]) for r in rs)]
print(f"{'body':<6} {'target':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cpu µs/req':>10} {'req/s vs nginx':>15} {'p99 vs nginx':>13} {'non-2xx':>8} {'sock err':>8}")
for body in bodies:
    base = med.get((body, "nginx"))
    for t in targets:
        if (body, t) not in med:
            continue
        rps, p50, p99, cpu, bad, err = med[body, t]
        r1 = f"{rps / base[0]:.2f}x" if base else "-"
        r2 = f"{p99 / base[2]:.2f}x" if base else "-"
        c = f"{cpu:.1f}" if t != "direct" else "-"
        print(f"{body:<6} {t:<8} {rps:>9.0f} {p50:>8.3f} {p99:>8.3f} {c:>10} {r1:>15} {r2:>13} {bad:>8} {err:>8}")
PY
