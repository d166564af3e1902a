#!/usr/bin/env bash
# Builds an image from the same tree (default 200 MB in 5,000 files, made
# deterministically) with kiln's builder, umoci and buildah, and prints wall
# times and sizes side by side.
#
#   bench/image-build.sh            # RUNS=3 SIZE_MB=200 FILES=5000
#   RUNS=5 SIZE_MB=50 bench/image-build.sh
#
# What is measured (each from an empty store unless said otherwise):
#   kiln cold      build the image: hash inputs, tar+gzip the layer, config,
#                  manifest, SBOM (crates/kiln-image/examples/kiln-build.rs)
#   kiln no-op     the same build again with nothing changed (cache hit)
#   umoci insert   `umoci insert` of the tree into an empty image
#   umoci repack   `umoci repack` of a bundle holding the tree (the copy of
#                  the tree into the bundle is not timed)
#   buildah        `buildah from scratch` + `copy` + `commit` to an OCI layout
#                  (vfs storage in a private root, if buildah is installed)
# Needs: python3, umoci; hyperfine if installed (else a `date` loop).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${RUNS:-3}
SIZE_MB=${SIZE_MB:-200}
FILES=${FILES:-5000}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-image-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "== building kiln's builder (release)" >&2
cargo build --quiet --release --manifest-path "$ROOT/Cargo.toml" -p kiln-image --example kiln-build
KILN="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/kiln-build"

echo "== making the tree: $SIZE_MB MB in $FILES files under $WORK/project/tree" >&2
mkdir -p "$WORK/project"
python3 - "$WORK/project/tree" "$SIZE_MB" "$FILES" <<'PY'
import os, random, sys
root, size_mb, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(20261121)
total = size_mb * 1024 * 1024
# A few big files (a quarter of the bytes), the rest small to medium.
big = max(1, files // 500)
sizes = [total // 4 // big] * big
rest = total - sum(sizes)
weights = [rng.random() + 0.05 for _ in range(files - big)]
scale = rest / sum(weights)
sizes += [max(1, int(w * scale)) for w in weights]
for i, size in enumerate(sizes):
    d = os.path.join(root, f"d{i % 50:02d}", f"s{i % 7}")
    os.makedirs(d, exist_ok=True)
    # Half random bytes, half text: compresses about like real software.
    half = size // 2
    text = (f"line {i} of a file that compresses well\n" * (half // 40 + 1))[:size - half]
    with open(os.path.join(d, f"f{i:05d}.bin"), "wb") as f:
        f.write(rng.randbytes(half))
        f.write(text.encode())
    os.chmod(os.path.join(d, f"f{i:05d}.bin"), 0o644 if i % 3 else 0o755)
PY
cat > "$WORK/project/kiln.toml" <<'EOF'
[project]
name = "bench"

[image.tree]
copy = [{ src = "tree", dst = "/app" }]
EOF
du -sh --apparent-size "$WORK/project/tree" >&2
find "$WORK/project/tree" -type f | wc -l >&2

KSTORE="$WORK/kiln-store"
ULAYOUT="$WORK/umoci"
BROOT="$WORK/buildah-root"
BRUN="$WORK/buildah-run"
BOUT="$WORK/buildah-oci"
TREE="$WORK/project/tree"

# Commands, as strings for hyperfine.
KILN_PREP="rm -rf $KSTORE"
KILN_CMD="$KILN $WORK/project $KSTORE"
UINS_PREP="rm -rf $ULAYOUT && umoci init --layout $ULAYOUT && umoci new --image $ULAYOUT:img"
UINS_CMD="umoci insert --image $ULAYOUT:img $TREE /app"
UREP_PREP="rm -rf $ULAYOUT $WORK/bundle && umoci init --layout $ULAYOUT && umoci new --image $ULAYOUT:img && umoci unpack --image $ULAYOUT:img $WORK/bundle && cp -a $TREE $WORK/bundle/rootfs/app && sync"
UREP_CMD="umoci repack --image $ULAYOUT:img $WORK/bundle"
BAH="buildah --root $BROOT --runroot $BRUN --storage-driver vfs"
BAH_PREP="$BAH rm --all >/dev/null 2>&1 || true; $BAH rmi --all --force >/dev/null 2>&1 || true; rm -rf $BOUT"
BAH_CMD="sh -c 'c=\$($BAH from scratch) && $BAH copy \$c $TREE /app >/dev/null && $BAH commit --quiet \$c oci:$BOUT:img >/dev/null'"

names=("kiln cold" "kiln no-op" "umoci insert" "umoci repack")
preps=("$KILN_PREP" "true" "$UINS_PREP" "$UREP_PREP")
cmds=("$KILN_CMD" "$KILN_CMD" "$UINS_CMD" "$UREP_CMD")
if command -v buildah >/dev/null; then
  names+=("buildah")
  preps+=("$BAH_PREP")
  cmds+=("$BAH_CMD")
fi

declare -A MEAN
run_one() { # name prep cmd
  local name=$1 prep=$2 cmd=$3
  if [ "$name" = "kiln no-op" ]; then eval "$KILN_CMD" >/dev/null 2>&1; fi
  if command -v hyperfine >/dev/null; then
    hyperfine --style basic --runs "$RUNS" --prepare "$prep" --export-json "$WORK/h.json" -n "$name" "$cmd" >&2
    MEAN[$name]=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"][0]; print("%.3f ± %.3f" % (r["mean"], r["stddev"] or 0))' "$WORK/h.json")
  else
    local times=()
    for _ in $(seq "$RUNS"); do
      eval "$prep" >/dev/null 2>&1
      local t0 t1; t0=$(date +%s.%N); eval "$cmd" >/dev/null; t1=$(date +%s.%N)
      times+=("$(python3 -c "print($t1 - $t0)")")
    done
    MEAN[$name]=$(printf '%s\n' "${times[@]}" | python3 -c 'import sys,statistics as s; v=[float(x) for x in sys.stdin]; print("%.3f ± %.3f" % (s.mean(v), s.pstdev(v)))')
  fi
}
for i in "${!names[@]}"; do
  echo "== ${names[$i]}" >&2
  run_one "${names[$i]}" "${preps[$i]}" "${cmds[$i]}"
done

# Sizes and reproducibility, from one more run of each.
layer_size() { # layout-dir tag -> size of the last layer, its media type, manifest digest
  python3 - "$1" "$2" <<'PY'
import json, os, sys
root, tag = sys.argv[1], sys.argv[2]
idx = json.load(open(os.path.join(root, "index.json")))
m = next(d for d in idx["manifests"] if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(os.path.join(root, "blobs", *m["digest"].split(":"))))
layer = man["layers"][-1]
print(layer["size"], layer["mediaType"].rsplit(".", 1)[-1], m["digest"][:19])
PY
}
eval "$KILN_PREP"; eval "$KILN_CMD" >/dev/null 2>&1; read -r ks kt kd < <(layer_size "$KSTORE" tree)
eval "$KILN_PREP"; eval "$KILN_CMD" >/dev/null 2>&1; read -r _ _ kd2 < <(layer_size "$KSTORE" tree)
eval "$UINS_PREP" >/dev/null 2>&1; eval "$UINS_CMD" >/dev/null 2>&1; read -r us ut ud < <(layer_size "$ULAYOUT" img)
eval "$UINS_PREP" >/dev/null 2>&1; sleep 1; eval "$UINS_CMD" >/dev/null 2>&1; read -r _ _ ud2 < <(layer_size "$ULAYOUT" img)
eval "$UREP_PREP" >/dev/null 2>&1; eval "$UREP_CMD" >/dev/null 2>&1; read -r rs rt rd < <(layer_size "$ULAYOUT" img)
if command -v buildah >/dev/null; then
  eval "$BAH_PREP"; eval "$BAH_CMD"; read -r bs bt bd < <(layer_size "$BOUT" img)
  eval "$BAH_PREP"; sleep 1; eval "$BAH_CMD"; read -r _ _ bd2 < <(layer_size "$BOUT" img)
  eval "$BAH_PREP"
fi
same() { [ "$1" = "$2" ] && echo yes || echo no; }

echo
echo "tree: $SIZE_MB MB, $FILES files; $RUNS runs each; $(nproc) cores; $(uname -r)"
printf '%-14s %-18s %-14s %-6s %s\n' tool "wall s (mean±sd)" "layer bytes" format "same digest twice"
printf '%-14s %-18s %-14s %-6s %s\n' "kiln cold" "${MEAN[kiln cold]}" "$ks" "$kt" "$(same "$kd" "$kd2") ($kd)"
printf '%-14s %-18s %-14s %-6s %s\n' "kiln no-op" "${MEAN[kiln no-op]}" "-" "-" "(cache hit)"
printf '%-14s %-18s %-14s %-6s %s\n' "umoci insert" "${MEAN[umoci insert]}" "$us" "$ut" "$(same "$ud" "$ud2") ($ud)"
printf '%-14s %-18s %-14s %-6s %s\n' "umoci repack" "${MEAN[umoci repack]}" "$rs" "$rt" "-"
if command -v buildah >/dev/null; then
  printf '%-14s %-18s %-14s %-6s %s\n' "buildah" "${MEAN[buildah]}" "$bs" "$bt" "$(same "$bd" "$bd2") ($bd)"
fi
