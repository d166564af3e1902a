#!/usr/bin/env python3
"""The engine's measurements for BENCHMARKS.md ("Engine"); run through
bench/engine.sh, which builds the release binaries and sets KILN, HELLO,
BUSYBOX and WORK.

    engine.py crash   crash -> replacement healthy (kiln) vs --restart=always (docker)
    engine.py apply   `kiln apply` of 1 and 10 instances (first, rolling, blue-green)
                      vs a `docker run` / `docker rm -f` loop
    engine.py idle    daemon CPU and RSS with N idle instances (no health
                      check; then hello with an http check) vs dockerd +
                      containerd + shims with M idle containers

Every figure printed is a median unless said otherwise. Times of the engine
come from its own records (events and journal: millisecond timestamps);
the script's clock is the same host clock.
"""

import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

KILN = os.environ["KILN"]
HELLO = os.environ["HELLO"]
BUSYBOX = os.environ.get("BUSYBOX", "/bin/busybox")
WORK = Path(os.environ["WORK"])
RUNS = int(os.environ.get("RUNS", "20"))
APPLY_RUNS = int(os.environ.get("APPLY_RUNS", "5"))
IDLE_N = int(os.environ.get("IDLE_N", "1000"))
IDLE_HEALTH_N = int(os.environ.get("IDLE_HEALTH_N", str(IDLE_N)))
IDLE_SECONDS = float(os.environ.get("IDLE_SECONDS", "60"))
DOCKER_IDLE_N = int(os.environ.get("DOCKER_IDLE_N", "100"))
DOCKER = os.environ.get("DOCKER", "1") != "0"
KILN_SIDE = os.environ.get("KILN_SIDE", "1") != "0"  # KILN_SIDE=0: the docker side only
HZ = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


RESULTS = Path(os.environ.get("RESULTS", "/tmp/kiln-engine-bench-results"))


def save(name, data):
    """Raw results so far, kept after the work dir is gone."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data))


def log(*a):
    print("..", *a, file=sys.stderr, flush=True)


def med(v):
    return statistics.median(v) if v else float("nan")


def spread(v):
    """p10-p90 of a list (nearest rank)."""
    if not v:
        return "-"
    s = sorted(v)
    lo = s[max(0, int(round(0.1 * (len(s) - 1))))]
    hi = s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]
    return f"{lo:.1f}-{hi:.1f}"


def sh(*args, check=True, capture=True, timeout=None, env=None):
    r = subprocess.run(
        [str(a) for a in args],
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def kiln(*args, **kw):
    return sh(KILN, *args, **kw)


def parse_at(text):
    # RFC3339 with milliseconds, e.g. 2026-11-22T03:20:01.123Z
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def events(proj, after=0):
    out = kiln("events", proj, "--json").stdout
    evs = [json.loads(l) for l in out.splitlines() if l.strip()]
    return [e for e in evs if e["seq"] > after]


def last_seq(proj):
    evs = events(proj)
    return evs[-1]["seq"] if evs else 0


def status(proj):
    return json.loads(kiln("status", proj, "--json").stdout)


def instances(st):
    return [i for s in st["services"] for i in s["instances"]]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get_ok(port, path="/healthz", timeout=0.2):
    """One HTTP GET; True on a 2xx."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
            c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            head = c.recv(64)
            return head.startswith(b"HTTP/1.1 2") or head.startswith(b"HTTP/1.0 2")
    except OSError:
        return False


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def wait_until(pred, timeout, every=0.001):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return time.time()
        time.sleep(every)
    raise TimeoutError("condition not met in time")


# ---- projects -------------------------------------------------------------

HELLO_IMAGE = """
[image.hello]
from = "scratch"
copy = [{ src = "bin/hello", dst = "/app/hello", mode = 0o755 }]
closure = true
entrypoint = ["/app/hello"]
"""

BUSYBOX_IMAGE = """
[image.bb]
from = "scratch"
copy = [{ src = "busybox", dst = "/bin/busybox", mode = 0o755 }]
"""


def hello_project(name, replicas, health, deploy, gen=0, route=True, extra="", stop_grace="2s"):
    d = WORK / name
    (d / "bin").mkdir(parents=True, exist_ok=True)
    if not (d / "bin" / "hello").exists():
        sh("cp", HELLO, d / "bin" / "hello")
    text = f"""[project]
name = "{name}"
{HELLO_IMAGE}
[service.web]
image = "hello"
replicas = {replicas}
command = ["/app/hello", "--port", "${{PORT}}", "--config", "/none"]
env = {{ GEN = "{gen}" }}
ports = {{ http = {{}} }}
{health}
deploy = {deploy}
stop_grace = "{stop_grace}"
{extra}
"""
    if route:
        text += f"""
[route.web]
listen = "127.0.0.1:{free_port()}"
service = "web"
port = "http"
"""
    (d / "kiln.toml").write_text(text)
    return d


def set_gen(proj, gen):
    p = proj / "kiln.toml"
    lines = [
        (f'env = {{ GEN = "{gen}" }}' if l.startswith("env = { GEN") else l)
        for l in p.read_text().splitlines()
    ]
    p.write_text("\n".join(lines) + "\n")


def start_daemon(proj, env=None):
    """Starts `kiln daemon` in the background (its own process group) and
    waits for its socket; returns the Popen."""
    logf = open(proj / "daemon.log", "ab")
    p = subprocess.Popen([KILN, "daemon", str(proj)], stdout=logf, stderr=logf,
                         stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    sock = proj / ".kiln" / "kiln.sock"
    end = time.time() + 60
    while time.time() < end:
        if sock.exists() and kiln("status", proj, check=False).returncode == 0:
            return p
        if p.poll() is not None:
            raise RuntimeError(f"kiln daemon exited: {(proj / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.02)
    raise RuntimeError("kiln daemon did not answer")


def down(proj, daemon=None):
    kiln("down", proj, check=False, timeout=600)
    if daemon is not None:
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(daemon.pid, signal.SIGTERM)
            daemon.wait(timeout=10)


def teardown(proj, daemon=None):
    """Stops every instance fast, then the daemon. `kiln down` alone stops
    instances one at a time with a 10 s grace whatever stop_grace says, and
    a program that is pid 1 of its namespace without a SIGTERM handler (hello,
    busybox sleep) waits all of it: scale to 0 with stop_grace = "0s" first
    (the destroy steps use the new generation's stop_grace)."""
    p = proj / "kiln.toml"
    text = p.read_text()
    text = re.sub(r"(?m)^replicas = .*$", "replicas = 0", text)
    text = re.sub(r'(?m)^stop_grace = .*$', 'stop_grace = "0s"', text)
    p.write_text(text)
    kiln("apply", proj, "-y", check=False, timeout=1800)
    down(proj, daemon)


def wait_healthy(proj, n, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        st = status(proj)
        ins = instances(st)
        if len(ins) == n and all(i["status"] == "healthy" for i in ins):
            return st
        time.sleep(0.1)
    raise TimeoutError(f"{n} instances not healthy in {timeout} s")


def journal_waits(proj, generation):
    """Sum of the await-healthy steps (end - begin) of a generation, and the
    sum of every step, from the engine's journal (ms timestamps)."""
    db = sqlite3.connect(f"file:{proj / '.kiln' / 'state.db'}?mode=ro", uri=True, timeout=10)
    rows = db.execute(
        "SELECT step_index, phase, step, at FROM journal WHERE generation = ? ORDER BY seq",
        (generation,),
    ).fetchall()
    db.close()
    begin, awaited, kinds = {}, 0.0, {}
    for idx, phase, step, at in rows:
        t = parse_at(at)
        kind = json.loads(step).get("action", "?")
        if phase == "begin":
            begin[idx] = (t, kind)
        elif phase == "end" and idx in begin:
            t0, k = begin[idx]
            kinds[k] = kinds.get(k, 0.0) + (t - t0)
            if k == "await-healthy":
                awaited += t - t0
    return awaited, kinds


# ---- docker ---------------------------------------------------------------

def docker_image(proj, image, tag):
    """Exports a kiln image into docker; returns the tag."""
    tar = WORK / f"{tag.replace(':', '_').replace('/', '_')}.tar"
    kiln("image", "export", image, "--format", "docker", "--tag", tag, "--output", tar,
         "--store", proj / ".kiln" / "images")
    sh("docker", "load", "-i", tar)
    return tag


def docker_rm(names):
    if names:
        sh("docker", "rm", "-f", *names, check=False, timeout=600)


# ---- 1. crash -> replacement healthy --------------------------------------

def app_start(runs):
    """exec -> first successful connect of the hello binary on the host."""
    out = []
    for _ in range(runs):
        port = free_port()
        t0 = time.perf_counter()
        p = subprocess.Popen([HELLO, "--port", str(port), "--config", "/none"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not accepts(port):
            time.sleep(0.0002)
        out.append((time.perf_counter() - t0) * 1000)
        p.kill()
        p.wait()
    return out


def crash():
    runs = RUNS
    log(f"app start: hello on the host, exec -> accepting, {runs} runs")
    start_ms = app_start(runs)
    app = med(start_ms)
    log(f"app start median {app:.1f} ms")

    proj = hello_project(
        "crash", 1,
        'health = { http = "/healthz", port = "http", interval = "1s", timeout = "500ms", healthy = 1 }',
        '{ strategy = "rolling", max_surge = 1, max_unavailable = 0 }',
    )
    kiln("build", proj)
    res = {"healthy": [], "route": [], "exited": [], "unhealthy": [], "replace": [], "created": [],
           "heal_path": [], "start_to_healthy": []}
    daemon = start_daemon(proj) if KILN_SIDE else None
    try:
        if not KILN_SIDE:
            raise StopIteration
        kiln("apply", proj, "-y", timeout=120)
        st = wait_healthy(proj, 1)
        route_port = int(st["routes"][0]["listen"].rsplit(":", 1)[1])
        for i in range(runs):
            st = wait_healthy(proj, 1)
            inst = instances(st)[0]
            # An instance that dies within 10 s of its start counts toward
            # the crash-loop backoff (as in Docker): kill older ones only.
            age = time.time() - parse_at(inst["created_at"]) if inst.get("created_at") else 0
            if age < 11:
                time.sleep(11 - age)
            seq = last_seq(proj)
            pid = inst["pid"]
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            # The route answering again (through kiln's proxy, to the new
            # instance): polled every 1 ms, as Docker's port is below.
            time.sleep(0.001)
            t_route = wait_until(lambda: get_ok(route_port), 30)
            end = time.time() + 30
            healthy = None
            while healthy is None and time.time() < end:
                for e in events(proj, seq):
                    if e["kind"] == "instance.healthy" and inst["id"] not in e["subject"]:
                        healthy = e
                time.sleep(0.05)
            evs = events(proj, seq)
            first = lambda k: next((parse_at(e["at"]) for e in evs if e["kind"] == k), float("nan"))
            t_h = parse_at(healthy["at"])
            res["healthy"].append((t_h - t_kill) * 1000)
            res["route"].append((t_route - t_kill) * 1000)
            res["exited"].append((first("instance.exited") - t_kill) * 1000)
            res["unhealthy"].append((first("instance.unhealthy") - t_kill) * 1000)
            res["replace"].append((first("heal.replace") - t_kill) * 1000)
            res["created"].append((first("instance.created") - t_kill) * 1000)
            # What the engine itself takes once it knows: heal.replace ->
            # the replacement healthy, and its created -> healthy.
            res["heal_path"].append((t_h - first("heal.replace")) * 1000)
            res["start_to_healthy"].append((t_h - first("instance.created")) * 1000)
            save("crash", {"app_ms": start_ms, "kiln": res})
            log(f"kiln run {i + 1}: exited {res['exited'][-1]:.0f} unhealthy {res['unhealthy'][-1]:.0f} heal {res['replace'][-1]:.0f} "
                f"created {res['created'][-1]:.0f} healthy {res['healthy'][-1]:.0f} route {res['route'][-1]:.0f} ms")
    except StopIteration:
        pass
    finally:
        if daemon is not None:
            down(proj, daemon)

    dres = []
    if DOCKER:
        tag = docker_image(proj, "hello", "kiln-bench/hello:1")
        port = free_port()
        name = "kiln-bench-crash"
        docker_rm([name])
        # The image's entrypoint is /app/hello: these are its arguments.
        sh("docker", "run", "-d", "--name", name, "--restart=always", "--network", "host",
           tag, "--port", port, "--config", "/none")
        try:
            wait_until(lambda: get_ok(port), 30)
            for i in range(runs):
                st = json.loads(sh("docker", "inspect", name).stdout)[0]["State"]
                age = time.time() - parse_at(st["StartedAt"][:26] + "Z") if "." in st["StartedAt"] else 11
                if age < 11:
                    time.sleep(11 - age)
                pid = st["Pid"]
                t_kill = time.time()
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.001)
                t_up = wait_until(lambda: get_ok(port), 30)
                dres.append((t_up - t_kill) * 1000)
                save("crash", {"app_ms": start_ms, "kiln": res, "docker": dres})
                log(f"docker run {i + 1}: {dres[-1]:.0f} ms")
        finally:
            docker_rm([name])

    print()
    print(f"## crash -> replacement serving, median of {runs} (p10-p90), ms; app start (exec -> accepting) {app:.1f} ms "
          f"(p10-p90 {spread(start_ms)})")
    print("| what | raw | net of app start |")
    print("|---|---|---|")
    for k, label in ([] if not res["healthy"] else [("exited", "kiln: kill -> instance.exited event"),
                     ("unhealthy", "kiln: kill -> instance.unhealthy event"),
                     ("replace", "kiln: kill -> heal.replace event"),
                     ("created", "kiln: kill -> replacement instance.created event"),
                     ("healthy", "kiln: kill -> replacement instance.healthy event"),
                     ("route", "kiln: kill -> route answers 200 (proxy -> new instance)")]):
        v = [x for x in res[k] if x == x]  # NaN: no such event
        seen = "" if len(v) == len(res[k]) else f" [event in {len(v)} of {len(res[k])} runs]"
        net = f"{med(v) - app:.1f}" if k in ("healthy", "route") else "-"
        print(f"| {label}{seen} | {med(v):.1f} ({spread(v)}) | {net} |")
    for k, label in ([] if not res["healthy"] else [("heal_path", "kiln: heal.replace -> replacement healthy (engine's own path once it knows)"),
                     ("start_to_healthy", "kiln: replacement instance.created -> instance.healthy")]):
        v = res[k]
        print(f"| {label} | {med(v):.1f} ({spread(v)}) | {med(v) - app:.1f} |")
    if dres:
        print(f"| docker --restart=always: kill -> port answers 200 | {med(dres):.1f} ({spread(dres)}) | {med(dres) - app:.1f} |")
    if dres and res["healthy"]:
        print(f"ratio docker/kiln (healthy event, net): {(med(dres) - app) / (med(res['healthy']) - app):.2f}x; "
              f"(route, net): {(med(dres) - app) / (med(res['route']) - app):.2f}x")
    print("raw json:", json.dumps({"app_ms": start_ms, "kiln": res, "docker": dres}))


# ---- 2. apply -> new generation serving -----------------------------------

def apply_bench():
    runs = APPLY_RUNS
    health = 'health = { http = "/healthz", port = "http", interval = "20ms", healthy = 1 }'
    rows = []
    for n in (1, 10):
        for strategy, deploy in [
            ("rolling", '{ strategy = "rolling", max_surge = 1, max_unavailable = 0, drain_timeout = "1s" }'),
            ("blue-green", '{ strategy = "blue-green", drain_timeout = "1s" }'),
        ]:
            proj = hello_project(f"apply-{n}-{strategy}", n, health, deploy, stop_grace="200ms")
            kiln("build", proj)
            spec = (proj / "kiln.toml").read_text()
            first = {"wall": [], "await": [], "destroy": []}
            change = {"wall": [], "await": [], "destroy": []}
            gen = 0
            # First apply, from nothing running: a fresh daemon each run
            # (started before the clock), `kiln down` after.
            if strategy == "rolling":
                for r in range(runs):
                    daemon = start_daemon(proj)
                    t0 = time.perf_counter()
                    out = kiln("apply", proj, "-y", timeout=600)
                    wall = (time.perf_counter() - t0) * 1000
                    number = status(proj)["active_generation"]
                    awaited, _ = journal_waits(proj, number)
                    first["wall"].append(wall)
                    first["await"].append(awaited * 1000)
                    first["destroy"].append(0.0)
                    log(f"first n={n} run {r + 1}: wall {wall:.0f} await {awaited * 1000:.0f} ms")
                    teardown(proj, daemon)
                    (proj / "kiln.toml").write_text(spec)
            daemon = start_daemon(proj)
            try:
                kiln("apply", proj, "-y", timeout=600)
                wait_healthy(proj, n)
                for r in range(runs):
                    gen += 1
                    set_gen(proj, gen)
                    time.sleep(0.5)
                    t0 = time.perf_counter()
                    kiln("apply", proj, "-y", timeout=600)
                    wall = (time.perf_counter() - t0) * 1000
                    number = status(proj)["active_generation"]
                    awaited, kinds = journal_waits(proj, number)
                    change["wall"].append(wall)
                    change["await"].append(awaited * 1000)
                    change["destroy"].append(kinds.get("destroy-instance", 0.0) * 1000)
                    log(f"change n={n} {strategy} run {r + 1}: wall {wall:.0f} await {awaited * 1000:.0f} ms; "
                        + ", ".join(f"{k} {v * 1000:.0f}" for k, v in kinds.items()))
            finally:
                teardown(proj, daemon)
            if first["wall"]:
                rows.append((f"first apply (create from nothing), {n} instance(s)", first))
            rows.append((f"replace all, {strategy}{', max_surge=1' if strategy == 'rolling' else ''}, {n} instance(s)", change))

    drows = []
    if DOCKER:
        proj = WORK / "apply-1-rolling"
        tag = docker_image(proj, "hello", "kiln-bench/hello:1")
        for n in (1, 10):
            ports = [free_port() for _ in range(n)]
            for label, recreate in [("first: docker run -d x N, until every port answers", False),
                                    ("replace: (docker rm -f; docker run -d) x N, until every port answers", True)]:
                walls = []
                for r in range(runs):
                    names = [f"kiln-bench-apply-{i}" for i in range(n)]
                    if not recreate:
                        docker_rm(names)
                    else:
                        # make sure they run before the timed recreation
                        for i, nm in enumerate(names):
                            if not get_ok(ports[i]):
                                docker_rm([nm])
                                sh("docker", "run", "-d", "--name", nm, "--network", "host", tag,
                                   "--port", ports[i], "--config", "/none")
                        for p in ports:
                            wait_until(lambda: get_ok(p), 30)
                    t0 = time.perf_counter()
                    for i, nm in enumerate(names):
                        if recreate:
                            sh("docker", "rm", "-f", nm)
                        sh("docker", "run", "-d", "--name", nm, "--network", "host", "-e", f"GEN={r}",
                           tag, "--port", ports[i], "--config", "/none")
                    for p in ports:
                        wait_until(lambda: get_ok(p), 30)
                    walls.append((time.perf_counter() - t0) * 1000)
                    log(f"docker n={n} {label[:8]} run {r + 1}: {walls[-1]:.0f} ms")
                drows.append((f"{label}, {n} container(s)", walls))
            docker_rm([f"kiln-bench-apply-{i}" for i in range(n)])

    print()
    print(f"## apply -> new generation serving, median of {runs}, ms (health check: http, interval 20 ms, healthy = 1)")
    print("| what | wall (`kiln apply -y`) | health waits (journal: await-healthy steps) | engine overhead = wall - health waits | of which destroy steps |")
    print("|---|---|---|---|---|")
    save("apply", {"kiln": rows, "docker": drows})
    for label, d in rows:
        over = [w - a for w, a in zip(d["wall"], d["await"])]
        print(f"| {label} | {med(d['wall']):.0f} ({spread(d['wall'])}) | {med(d['await']):.0f} | {med(over):.0f} ({spread(over)}) | {med(d['destroy']):.0f} |")
    for label, walls in drows:
        print(f"| docker: {label} | {med(walls):.0f} ({spread(walls)}) | - | - | - |")
    print("raw json:", json.dumps({"kiln": rows, "docker": drows}))


# ---- 3. idle cost ---------------------------------------------------------

def proc_cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_field(pid, name):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1]
    return "?"


def all_procs():
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            comm = s[s.index("(") + 1:s.rindex(")")]
            ppid = int(s.rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            out[int(d)] = (ppid, comm, cmd)
        except (OSError, ValueError):
            pass
    return out


def group_usage(pids, seconds):
    """RSS now (KiB, summed) and CPU over `seconds` (percent of one core,
    summed) of a set of processes."""
    pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
    t0 = {}
    for p in pids:
        try:
            t0[p] = proc_cpu_ticks(p)
        except OSError:
            pass
    time.sleep(seconds)
    ticks, rss = 0, 0
    for p, v in t0.items():
        try:
            ticks += proc_cpu_ticks(p) - v
            rss += proc_rss_kib(p)
        except OSError:
            pass
    return rss, ticks / HZ / seconds * 100


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def idle_variant(name, n, text, seconds):
    proj = WORK / name
    proj.mkdir(parents=True, exist_ok=True)
    (proj / "kiln.toml").write_text(text)
    kiln("build", proj)
    daemon = start_daemon(proj)
    result = {"n": n}
    try:
        rss0 = proc_rss_kib(daemon.pid)
        t0 = time.perf_counter()
        r = kiln("apply", proj, "-y", timeout=3600, check=False)
        result["apply_s"] = time.perf_counter() - t0
        result["apply_rc"] = r.returncode
        if r.returncode != 0:
            result["error"] = (r.stdout + r.stderr)[-3000:]
            log(f"{name}: apply failed: {result['error']}")
        st = status(proj)
        ins = instances(st)
        result["instances"] = len(ins)
        result["healthy"] = sum(1 for i in ins if i["status"] == "healthy")
        log(f"{name}: apply {result['apply_s']:.1f} s rc {r.returncode}; {result['healthy']}/{len(ins)} healthy")
        time.sleep(10)  # settle
        result["daemon_rss_before_kib"] = rss0
        result["daemon_threads"] = proc_field(daemon.pid, "Threads")
        result["daemon_fds"] = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        procs = all_procs()
        # Each instance's process is a child of its supervisor (a fork of
        # the daemon, re-parented to init): the supervisors are the
        # parents of the pids `kiln status` reports.
        inst_pids = [i["pid"] for i in instances(status(proj)) if i.get("pid")]
        grand = [p for p in inst_pids if p in procs]
        kids = sorted({procs[p][0] for p in grand if procs[p][0] > 1})
        result["supervisors"] = len(kids)
        result["supervisor_comm"] = sorted({procs[p][1] for p in kids if p in procs})
        result["instance_procs"] = len(grand)
        # Measure the daemon and the supervisors over the same window
        # (two threads of sampling would be overkill: sample both sets).
        pids = [daemon.pid] + kids
        t_ticks = {}
        for p in pids:
            try:
                t_ticks[p] = proc_cpu_ticks(p)
            except OSError:
                pass
        t_start = time.time()
        time.sleep(seconds)
        elapsed = time.time() - t_start
        d_ticks = proc_cpu_ticks(daemon.pid) - t_ticks[daemon.pid]
        s_ticks = 0
        s_rss = 0
        for p in kids:
            try:
                s_ticks += proc_cpu_ticks(p) - t_ticks.get(p, 0)
                s_rss += proc_rss_kib(p)
            except OSError:
                pass
        result["daemon_rss_kib"] = proc_rss_kib(daemon.pid)
        result["daemon_hwm_kib"] = int(proc_field(daemon.pid, "VmHWM"))
        result["daemon_cpu_pct"] = d_ticks / HZ / elapsed * 100
        result["supervisors_rss_kib"] = s_rss
        result["supervisors_pss_kib"] = sum(pss_kib(p) for p in kids)
        result["daemon_pss_kib"] = pss_kib(daemon.pid)
        result["supervisors_cpu_pct"] = s_ticks / HZ / elapsed * 100
        inst_rss = 0
        for p in grand:
            try:
                inst_rss += proc_rss_kib(p)
            except OSError:
                pass
        result["instances_rss_kib"] = inst_rss
        st = status(proj)
        ins = instances(st)
        result["healthy_after"] = sum(1 for i in ins if i["status"] == "healthy")
        evs = events(proj)
        kinds = {}
        for e in evs:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        result["event_kinds"] = kinds
        log(f"{name}: {json.dumps(result)}")
    finally:
        t0 = time.perf_counter()
        teardown(proj, daemon)
        result["down_s"] = time.perf_counter() - t0
    return result


def idle():
    seconds = IDLE_SECONDS
    bbdir = WORK / "idle-sleep"
    bbdir.mkdir(parents=True, exist_ok=True)
    sh("cp", BUSYBOX, bbdir / "busybox")
    variants = os.environ.get("IDLE_VARIANTS", "sleep,hello").split(",")
    results = []
    if "sleep" in variants:
        results.append(("sleep, no health check", idle_variant("idle-sleep", IDLE_N, f"""[project]
name = "idle-sleep"
{BUSYBOX_IMAGE}
[service.idle]
image = "bb"
replicas = {IDLE_N}
command = ["/bin/busybox", "sleep", "1000000"]
stop_grace = "1s"
deploy = {{ deadline = "30m" }}
""", seconds)))
    hp = WORK / "idle-hello"
    (hp / "bin").mkdir(parents=True, exist_ok=True)
    sh("cp", HELLO, hp / "bin" / "hello")
    if "hello" in variants:
        results.append(("hello, http check every 1 s", idle_variant("idle-hello", IDLE_HEALTH_N, f"""[project]
name = "idle-hello"
{HELLO_IMAGE}
[service.web]
image = "hello"
replicas = {IDLE_HEALTH_N}
command = ["/app/hello", "--port", "${{PORT}}", "--config", "/none"]
ports = {{ http = {{}} }}
health = {{ http = "/healthz", port = "http", interval = "1s", timeout = "500ms", healthy = 1 }}
stop_grace = "2s"
deploy = {{ deadline = "30m" }}
""", seconds)))

    dres = None
    if DOCKER:
        tag = docker_image(bbdir, "bb", "kiln-bench/busybox:1")

        def engine_pids():
            procs = all_procs()
            return [p for p, (_, comm, _) in procs.items()
                    if comm in ("dockerd", "containerd") or comm.startswith("containerd-shim")]

        rss_base, cpu_base = group_usage(engine_pids(), seconds)
        names = [f"kiln-bench-idle-{i}" for i in range(DOCKER_IDLE_N)]
        docker_rm(names)
        t0 = time.perf_counter()
        for nm in names:
            sh("docker", "run", "-d", "--name", nm, "--network", "host", tag, "/bin/busybox", "sleep", "1000000")
        start_s = time.perf_counter() - t0
        time.sleep(10)
        try:
            pids = engine_pids()
            shims = [p for p in pids if all_procs().get(p, (0, "", ""))[1].startswith("containerd-shim")]
            rss, cpu = group_usage(pids, seconds)
            shim_rss = sum(proc_rss_kib(p) for p in shims if os.path.exists(f"/proc/{p}"))
            dres = dict(n=DOCKER_IDLE_N, base_rss_kib=rss_base, base_cpu_pct=cpu_base, rss_kib=rss,
                        cpu_pct=cpu, shims=len(shims), shim_rss_kib=shim_rss, start_s=start_s)
            log(f"docker idle: {json.dumps(dres)}")
        finally:
            docker_rm(names)

    save("idle", {"kiln": results, "docker": dres})
    print()
    print(f"## idle cost, CPU over {seconds:.0f} s (percent of one core), RSS (VmRSS)")
    print("| what | instances healthy | apply | daemon RSS | daemon CPU | supervisors (n, RSS total, CPU) | instances' RSS |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results:
        if "daemon_rss_kib" not in r:
            print(f"| kiln, {label} | failed: {r.get('error', '?')[:200]} | | | | | |")
            continue
        print(f"| kiln, {r['n']} x {label} | {r['healthy_after']}/{r['n']} | {r['apply_s']:.1f} s | "
              f"{r['daemon_rss_kib'] / 1024:.1f} MiB (peak {r['daemon_hwm_kib'] / 1024:.1f}) | {r['daemon_cpu_pct']:.2f}% | "
              f"{r['supervisors']}, RSS {r['supervisors_rss_kib'] / 1024:.1f} MiB (PSS {r['supervisors_pss_kib'] / 1024:.1f}), {r['supervisors_cpu_pct']:.2f}% | "
              f"{r['instances_rss_kib'] / 1024:.1f} MiB |")
    if dres:
        n = dres["n"]
        print(f"| docker, {n} x busybox sleep: dockerd + containerd + {dres['shims']} shims | {n}/{n} | "
              f"{dres['start_s']:.1f} s (docker run -d loop) | {dres['rss_kib'] / 1024:.1f} MiB "
              f"(idle engine, 0 containers: {dres['base_rss_kib'] / 1024:.1f}; shims {dres['shim_rss_kib'] / 1024:.1f}) | "
              f"{dres['cpu_pct']:.2f}% (0 containers: {dres['base_cpu_pct']:.2f}%) | - | - |")
    print("raw json:", json.dumps({"kiln": results, "docker": dres}))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    for w in (["crash", "apply", "idle"] if what == "all" else [what]):
        {"crash": crash, "apply": apply_bench, "idle": idle}[w]()
        sys.stdout.flush()
