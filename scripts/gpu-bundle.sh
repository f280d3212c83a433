#!/usr/bin/env bash
# Pack what a bare CUDA host (Linux x86-64, glibc >= 2.35, Python 3.12 with torch and torchvision) needs to serve
# this repository and measure it, into one xz-compressed tar of at most 60 MiB (docs/deploy.md, "GPU bundle"):
#
#   triton/pytriton/tritonserver/...   tritonserver 2.51 (bin/), the python backend (backends/python/), the local
#                                      response cache (caches/local/) and ONE python-backend stub
#                                      (python_backend_stubs/X.Y/): the nvidia-pytriton wheel's own layout, so
#                                      the RPATHs ($ORIGIN/../../../nvidia_pytriton.libs) resolve unchanged
#   triton/nvidia_pytriton.libs/       only the shared libraries those files need (readelf NEEDED, recursively)
#   perf_analyzer/bin, perf_analyzer/lib   perf_analyzer (tritonclient 2.51) with libb64.so.0d and libcudart.so.12
#                                      (links to the wheel's hashed copies under their plain names)
#   wheels/                            mmfuse (built from this checkout), numpy 1.26.4, open_clip_torch,
#                                      tritonclient[grpc] and every pure/binary dependency a host with torch and
#                                      torchvision lacks, for the target CPython (cpXY, manylinux_2_35); stored
#                                      zip STORED (contents and RECORD unchanged) so that xz compresses them well
#   model_repository/                  this checkout's model repository
#   gpu-check.sh, MANIFEST.json        the on-host check (scripts/gpu-check.sh) and what is in here (sha256 each)
#
# Usage: scripts/gpu-bundle.sh [OUT.tar.xz] [--python 3.12] [--max-mib 60]
#   OUT defaults to dist/mmfuse-gpu-bundle-py<X.Y>.tar.xz. The content is always xz (preset 9e, 256 MiB
#   dictionary, x86 filter: ~4 min, ~2.7 GiB of memory), whatever the name says; tar -xf and gpu-check.sh detect it.
#   --python picks the stub and the wheels' CPython (3.11 proves the bundle on a 3.11 machine).
# Needs: this checkout's .venv (nvidia-pytriton 0.7.0, tritonclient 2.51.0 installed: scripts/setup.sh), readelf,
# xz, and the network for `pip download` (the target host needs none: scripts/gpu-check.sh runs offline).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV_PY=${VENV_PY:-$ROOT/.venv/bin/python}
PYV=3.12
MAX_MIB=60
OUT=""
PLATFORM=manylinux_2_35_x86_64  # nvidia-pytriton 0.7.0's own tag: the host needs glibc >= 2.35 anyway (and older tags)

die() { echo "gpu-bundle: error: $*" >&2; exit 1; }
log() { echo "gpu-bundle: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --python) [ $# -ge 2 ] || die "--python needs a version (3.10, 3.11, 3.12, 3.13)"; PYV=$2; shift 2 ;;
    --python=*) PYV=${1#*=}; shift ;;
    --max-mib) [ $# -ge 2 ] || die "--max-mib needs a number"; MAX_MIB=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$OUT" ] || die "one output file only (got $OUT and $1)"; OUT=$1; shift ;;
  esac
done
[[ $PYV =~ ^3\.[0-9]+$ ]] || die "--python $PYV: expected MAJOR.MINOR, e.g. 3.12"
[[ $MAX_MIB =~ ^[0-9]+$ ]] || die "--max-mib $MAX_MIB: expected a whole number"
OUT=${OUT:-$ROOT/dist/mmfuse-gpu-bundle-py$PYV.tar.xz}
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT ;; esac
for tool in readelf xz tar sha256sum git; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
[ -x "$VENV_PY" ] || die "$VENV_PY not found: run scripts/setup.sh first (or set VENV_PY)"

SITE=$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
TS=$SITE/pytriton/tritonserver
LIBS=$SITE/nvidia_pytriton.libs
STUB=$TS/python_backend_stubs/$PYV/triton_python_backend_stub
PERF=$(dirname "$VENV_PY")/perf_analyzer
[ -x "$TS/bin/tritonserver" ] || die "$TS/bin/tritonserver missing: install nvidia-pytriton==0.7.0 in the .venv"
[ -f "$STUB" ] || die "no python-backend stub for Python $PYV in $TS/python_backend_stubs ($(ls "$TS/python_backend_stubs" | tr '\n' ' '))"
[ -x "$PERF" ] || die "$PERF missing: install tritonclient==2.51.0 in the .venv"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mmfuse-gpu-bundle.XXXXXX")
trap 'rm -rf "$WORK" "$OUT.part"' EXIT
B=$WORK/mmfuse-gpu-bundle
mkdir -p "$B"/triton/pytriton/tritonserver/{bin,backends/python,caches/local,python_backend_stubs/"$PYV"} \
         "$B"/triton/nvidia_pytriton.libs "$B"/perf_analyzer/{bin,lib} "$B"/wheels
started=$(date +%s)

# 1. tritonserver, the python backend, the response cache, one stub: the wheel's layout.
log "tritonserver 2.51 + python backend + stub for Python $PYV from $TS"
T=$B/triton/pytriton/tritonserver
cp -p "$TS/bin/tritonserver" "$T/bin/"
cp -p "$TS/backends/python/libtriton_python.so" "$TS/backends/python/triton_python_backend_utils.py" "$T/backends/python/"
cp -p "$TS/caches/local/libtritoncache_local.so" "$T/caches/local/"
cp -p "$STUB" "$T/python_backend_stubs/$PYV/"

# 2. The shared libraries they link, followed recursively through readelf NEEDED; the rest stays behind.
"$VENV_PY" - "$LIBS" "$B/triton/nvidia_pytriton.libs" "$B/needed-libs.json" \
    "$T/bin/tritonserver" "$T/backends/python/libtriton_python.so" "$T/caches/local/libtritoncache_local.so" \
    "$T/python_backend_stubs/$PYV/triton_python_backend_stub" <<'PY'
import json, os, re, shutil, subprocess, sys
libs, dest, report, roots = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
have = set(os.listdir(libs))
bundled, system, stack = set(), set(), list(roots)
while stack:
    elf = stack.pop()
    out = subprocess.run(["readelf", "-d", elf], capture_output=True, text=True, check=True).stdout
    for name in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out):
        if name in have:
            if name not in bundled:
                bundled.add(name)
                stack.append(os.path.join(libs, name))
        else:
            system.add(name)
for name in sorted(bundled):
    shutil.copy2(os.path.join(libs, name), dest)
json.dump({"bundled": sorted(bundled), "left_out": sorted(have - bundled), "from_the_host": sorted(system)},
          open(report, "w"), indent=1)
print(f"gpu-bundle: {len(bundled)} libraries needed, left out: {', '.join(sorted(have - bundled)) or 'none'}; "
      f"from the host: {', '.join(sorted(system))}", file=sys.stderr)
PY

# 3. perf_analyzer with the two libraries it looks for under plain names (links into nvidia_pytriton.libs).
cp -p "$PERF" "$B/perf_analyzer/bin/"
for pair in "libb64-*.so.0d:libb64.so.0d" "libcudart-*.so.12*:libcudart.so.12"; do
  pattern=${pair%%:*}; plain=${pair#*:}
  # shellcheck disable=SC2086
  target=$(cd "$B/triton/nvidia_pytriton.libs" && ls $pattern 2>/dev/null | head -1)
  [ -n "$target" ] || die "$pattern is not among the bundled libraries"
  ln -s "../../triton/nvidia_pytriton.libs/$target" "$B/perf_analyzer/lib/$plain"
done

# 4. Wheels: mmfuse from this checkout (a copy of its tracked and new files, so nothing is built inside it).
log "building the mmfuse wheel from $ROOT"
mkdir -p "$WORK/src"
checkout_files() {  # NUL-separated paths under the given folders: tracked or new, not ignored, still present
  (cd "$ROOT" && git ls-files -co --exclude-standard -z -- "$@") |
    while IFS= read -r -d '' f; do [ -e "$ROOT/$f" ] && printf '%s\0' "$f"; done
}
checkout_files pyproject.toml README.md mmfuse python_backends clients model_repository > "$WORK/src.list"
tar -C "$ROOT" --null -T "$WORK/src.list" -cf - | tar -xf - -C "$WORK/src"
"$VENV_PY" -m pip wheel -q --no-deps --no-build-isolation -w "$B/wheels" "$WORK/src" >&2 \
  || die "pip wheel of the checkout failed"

# ... and the dependencies a host with torch + torchvision lacks, at the versions this .venv runs (tested).
"$VENV_PY" - "$PYV" > "$WORK/requirements.txt" <<'PY'
import importlib.metadata as md, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canon
env = {"python_version": sys.argv[1], "python_full_version": sys.argv[1] + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix"}
def closure(roots):
    seen, stack = {}, list(roots)
    while stack:
        name, extras = stack.pop()
        key = canon(name)
        if key in seen and set(extras) <= seen[key]:
            continue
        seen.setdefault(key, set()).update(extras)
        for line in md.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate(dict(env, extra=e)) for e in (*extras, "")):
                stack.append((req.name, tuple(req.extras)))
    return seen
host = closure([("torch", ()), ("torchvision", ())])  # the target host has these (and their dependencies)
need = closure([("mmfuse", ("client",))])
for key in sorted(set(need) - set(host) - {"mmfuse"}):
    print(f"{key}=={md.version(key)}")
print("numpy==1.26.4")  # Triton 2.51's stub predates numpy 2 (shared notes, trap 1): always the bundle's own
PY
log "downloading $(wc -l < "$WORK/requirements.txt") wheels for CPython $PYV ($PLATFORM): $(tr '\n' ' ' < "$WORK/requirements.txt")"
# pip 23 takes --platform literally (no older manylinux tags implied): name every one up to the target's.
platforms=()
for minor in $(seq 35 -1 17); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
timeout 900 "$VENV_PY" -m pip download --only-binary=:all: --no-deps --python-version "$PYV" --implementation cp \
    --abi "cp${PYV/./}" "${platforms[@]}" -d "$B/wheels" -r "$WORK/requirements.txt" > "$WORK/pip-download.log" 2>&1 \
  || die "pip download failed (this step needs the network): $(grep -E '^ERROR' "$WORK/pip-download.log" | head -5)"

# Wheels travel uncompressed (zip STORED; the files inside and their RECORD unchanged): xz then compresses their
# contents far better than deflate did, and finds the copies the bundle holds twice (the model repository inside
# the mmfuse wheel, perf_analyzer inside the tritonclient wheel).
"$VENV_PY" - "$B/wheels" > "$WORK/wheel-sources.json" <<'PY'
import hashlib, json, os, sys, zipfile
folder, sources = sys.argv[1], {}
for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    sources[name] = {"downloaded_sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
                     "downloaded_bytes": os.path.getsize(path)}
    with zipfile.ZipFile(path) as z, zipfile.ZipFile(path + ".stored", "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            out.writestr(info, z.read(info), compress_type=zipfile.ZIP_STORED)
    os.replace(path + ".stored", path)
json.dump(sources, sys.stdout)
PY

# 5. The model repository, gpu-check.sh.
checkout_files model_repository > "$WORK/repo.list"
tar -C "$ROOT" --null -T "$WORK/repo.list" -cf - | tar -xf - -C "$B"
cp -p "$ROOT/scripts/gpu-check.sh" "$B/gpu-check.sh"
chmod +x "$B/gpu-check.sh"

# 6. MANIFEST.json: what, for which Python, from which commit; every file with its size and sha256.
"$VENV_PY" - "$B" "$PYV" "$ROOT" "$WORK/wheel-sources.json" <<'PY'
import hashlib, importlib.metadata as md, json, os, subprocess, sys, time
bundle, pyv, root = sys.argv[1], sys.argv[2], sys.argv[3]
git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True).stdout.strip()
libs = json.load(open(os.path.join(bundle, "needed-libs.json")))
os.remove(os.path.join(bundle, "needed-libs.json"))
wheel_sources = json.load(open(sys.argv[4]))
files, links = {}, {}
for folder, _, names in os.walk(bundle):
    for name in names:
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, bundle)
        if os.path.islink(path):
            links[rel] = os.readlink(path)
        else:
            data = open(path, "rb").read()
            files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
manifest = {
    "format": "mmfuse-gpu-bundle/1",
    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "source": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))},
    "python": pyv,
    "platform": "linux x86-64, glibc >= 2.35 (manylinux_2_35)",
    "tritonserver": {"version": "2.51.0", "from": f"nvidia-pytriton {md.version('nvidia-pytriton')}",
                     "binary": "triton/pytriton/tritonserver/bin/tritonserver",
                     "backend_dir": "triton/pytriton/tritonserver/backends",
                     "stub": f"triton/pytriton/tritonserver/python_backend_stubs/{pyv}/triton_python_backend_stub"},
    "libraries": libs,
    "perf_analyzer": {"binary": "perf_analyzer/bin/perf_analyzer", "lib": "perf_analyzer/lib",
                      "from": f"tritonclient {md.version('tritonclient')}"},
    "wheels": sorted(n for n in os.listdir(os.path.join(bundle, "wheels")) if n.endswith(".whl")),
    "wheels_note": "repacked zip STORED (contents and RECORD unchanged); downloaded_sha256 is the registry's file",
    "wheel_sources": wheel_sources,
    "compression": "xz --x86 --lzma2=preset=9e,dict=256MiB (decompressing needs ~260 MiB of memory)",
    "not_bundled": "torch, torchvision and their dependencies (the host's); libpython, libstdc++, libz, glibc",
    "model_repository": "model_repository",
    "files": dict(sorted(files.items())),
    "links": dict(sorted(links.items())),
    "unpacked_bytes": sum(f["bytes"] for f in files.values()),
}
json.dump(manifest, open(os.path.join(bundle, "MANIFEST.json"), "w"), indent=1)
print(f"gpu-bundle: {len(files)} files, {manifest['unpacked_bytes'] / 2**20:.1f} MiB unpacked, "
      f"{len(manifest['wheels'])} wheels", file=sys.stderr)
PY

# 7. One tar, xz at its strongest: preset 9e, a 256 MiB dictionary (one block, so repeats anywhere in the bundle are
# found) and the x86 branch filter for the machine code that makes up most of it. Copies sit next to each other.
mkdir -p "$(dirname "$OUT")"
(
  cd "$WORK"
  top=mmfuse-gpu-bundle
  { echo "$top"; echo "$top/MANIFEST.json"; echo "$top/gpu-check.sh"; find "$top/model_repository" | sort
    echo "$top/wheels"; ls "$top"/wheels/mmfuse-*.whl; find "$top/perf_analyzer" | sort
    ls "$top"/wheels/tritonclient-*.whl; find "$top/triton" | sort
    ls "$top"/wheels/*.whl | grep -v -e "/mmfuse-" -e "/tritonclient-"; } > "$WORK/order.txt"
)
[ "$(wc -l < "$WORK/order.txt")" -eq "$(cd "$WORK" && find mmfuse-gpu-bundle | wc -l)" ] || die "the tar order misses files"
log "compressing (xz --x86 --lzma2=preset=9e,dict=256MiB; a few minutes, ~2.7 GiB of memory) ..."
tar -C "$WORK" --no-recursion -T "$WORK/order.txt" --owner=0 --group=0 --numeric-owner -cf - \
  | xz --x86 --lzma2=preset=9e,dict=256MiB -T1 -c > "$OUT.part"
mv "$OUT.part" "$OUT"
bytes=$(stat -c %s "$OUT")
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu-bundle: $OUT: $bytes bytes ($mib MiB; limit $MAX_MIB MiB), Python $PYV, $(( $(date +%s) - started )) s"
if [ "$bytes" -gt $(( MAX_MIB * 1048576 )) ]; then
  rm -f "$OUT"
  die "the bundle is $mib MiB, over the $MAX_MIB MiB limit; removed it"
fi
