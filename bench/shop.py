"""Measurements of bench/shop.sh: see its header."""

import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as r:
            return r.status == 200
    except Exception:
        return False


def downtime(kiln, project, port, runs):
    conf = os.path.join(project, "config/postgresql.conf")
    base = open(conf).read()
    gaps = []
    for run in range(runs):
        while not ready(port):
            time.sleep(0.05)
        samples = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                t = time.monotonic()
                samples.append((t, ready(port)))
                time.sleep(0.005)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.2)
        with open(conf, "w") as f:
            f.write(base + f"work_mem = '{8 + run}MB'\n")
        subprocess.run([kiln, "apply", project, "-y"], check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not ready(port) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        stop.set()
        poller.join()
        failures = [i for i, (_, ok) in enumerate(samples) if not ok]
        if not failures:
            gaps.append(0.0)
            print(f"  run {run + 1}: never unavailable ({len(samples)} probes)")
            continue
        first, last = failures[0], failures[-1]
        before = samples[first - 1][0] if first > 0 else samples[0][0]
        after = samples[last + 1][0] if last + 1 < len(samples) else samples[-1][0]
        gaps.append(after - before)
        print(f"  run {run + 1}: {1000 * (after - before):.0f} ms unavailable ({len(failures)} failed probes of {len(samples)})")
    with open(conf, "w") as f:
        f.write(base)
    print(f"unavailability: median {1000 * statistics.median(gaps):.0f} ms, "
          f"min {1000 * min(gaps):.0f} ms, max {1000 * max(gaps):.0f} ms over {runs} replacements")


def du(path):
    out = subprocess.run(["du", "-sb", path], check=True, capture_output=True, text=True).stdout
    return int(out.split()[0])


def build(kiln, project, runs, work):
    spec = os.path.join(project, "kiln.toml")
    text = open(spec).read()
    m = re.search(r'debian = \[([^\]]*)\]', text)
    packages = [p.strip().strip('"') for p in m.group(1).split(",")]
    # Warm the .deb cache (and kiln.lock) once.
    subprocess.run([kiln, "build", project], check=True, stdout=subprocess.DEVNULL)
    images = os.path.join(project, ".kiln/images")
    cold, warm = [], []
    for run in range(runs):
        # Only the verified .debs and apt's lists stay: a fresh image store,
        # every package unpacked again (what debootstrap does from its cache).
        for p in ["blobs", "index.json", "kiln/build-cache", "kiln/rootfs", "kiln/sbom",
                  "kiln/debian/unpacked"]:
            path = os.path.join(images, p)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        t = time.monotonic()
        subprocess.run([kiln, "build", project], check=True, stdout=subprocess.DEVNULL)
        cold.append(time.monotonic() - t)
        # A new image env: a new recipe on the same store, packages already
        # unpacked once (kiln's own cache).
        with open(spec, "w") as f:
            f.write(text.replace('PGDATA = "', f'BENCH_RUN = "{time.time_ns()}", PGDATA = "', 1))
        t = time.monotonic()
        subprocess.run([kiln, "build", project], check=True, stdout=subprocess.DEVNULL)
        warm.append(time.monotonic() - t)
        with open(spec, "w") as f:
            f.write(text)
    times = cold
    out = subprocess.run([kiln, "image", "ls", "-C", project, "--json"], capture_output=True, text=True)
    kiln_size = None
    if out.returncode == 0:
        import json
        for img in json.loads(out.stdout):
            if "postgres" in str(img.get("tags", img.get("name", ""))):
                kiln_size = img.get("size")
    print(f"kiln build, fresh store, warm .deb cache: median {statistics.median(cold):.2f} s {['%.2f' % t for t in cold]}")
    print(f"kiln build, new recipe, packages already unpacked: median {statistics.median(warm):.2f} s {['%.2f' % t for t in warm]}")
    root = os.path.join(images, "kiln/rootfs")
    roots = [os.path.join(root, d) for d in os.listdir(root)] if os.path.isdir(root) else []
    if roots:
        print(f"kiln image root (largest unpacked): {max(du(r) for r in roots) / 1e6:.1f} MB")
    if kiln_size:
        print(f"kiln image: {kiln_size / 1e6:.1f} MB compressed")

    cache = os.path.join("/var/cache/kiln-bench-debootstrap")
    os.makedirs(cache, exist_ok=True)
    mirror = "http://deb.debian.org/debian"
    target = os.path.join(work, "debootstrap")
    cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
           f"--cache-dir={cache}", "bookworm", target, mirror]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # warms the cache
    shutil.rmtree(target)
    dtimes = []
    for run in range(runs):
        t = time.monotonic()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        dtimes.append(time.monotonic() - t)
        if run + 1 < runs:
            shutil.rmtree(target)
    size = du(target)
    gz = subprocess.run(f"tar -C {target} -c . | gzip -1 | wc -c", shell=True, check=True,
                        capture_output=True, text=True).stdout
    print(f"debootstrap --variant=minbase (warm cache): median {statistics.median(dtimes):.2f} s {['%.2f' % t for t in dtimes]}")
    print(f"debootstrap tree: {size / 1e6:.1f} MB unpacked, {int(gz) / 1e6:.1f} MB as tar.gz -1")
    print(f"ratio: kiln {statistics.median(dtimes) / statistics.median(times):.1f}x faster")


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "downtime":
        downtime(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        build(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
