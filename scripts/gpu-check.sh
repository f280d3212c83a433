#!/usr/bin/env bash
# Prove a host serves mmfuse, from a bundle of scripts/gpu-bundle.sh, with no network (docs/deploy.md, "GPU bundle").
#
# Usage: [PYTHON=python3] gpu-check.sh BUNDLE.tar.xz OUT_DIR [--profile gpu|cpu|baseline] [--quick] [--no-bench]
#                                      [--duration S] [--ready-timeout S]
#   PYTHON     the host interpreter that imports torch and torchvision (default python3); its X.Y must be the
#              bundle's. A system Python, or a virtual or conda environment's (its site-packages are lent, below).
#   OUT_DIR    new or empty: the unpacked bundle (bundle/), the environment (venv/), the served repository
#              (repository/), logs/, answers/, perf/, inprocess.json and gpu-check.json end up here.
#   --profile  the serving settings applied to the shipped repository (default gpu: KIND_GPU, fp16; cpu needs
#              openvino on the host; baseline: fp32, one instance each, runs anywhere)
#   --quick    3 s perf_analyzer windows (default 10 s: --duration) and the in-process bench's quick mode
#   --ready-timeout  seconds to wait for the server's readiness (default 600: model loads, first CUDA init)
#   --no-bench skip the in-process half (python -m mmfuse.bench --gpu; on a CPU: mmfuse bench --no-served)
#
# Steps (each bounded by a timeout): unpack and verify every file's sha256 against MANIFEST.json; make a virtual
# environment with --system-site-packages from PYTHON (+ a .pth line naming PYTHON's own site-packages, so a
# PYTHON that is itself a venv lends its torch too), install the bundled wheels offline (pip --no-index; the
# environment's own numpy 1.26.4 comes first on sys.path: Triton 2.51's stub needs numpy<2); put the stub next to
# libtriton_python.so; `mmfuse apply-profile`; `mmfuse serve` with MMFUSE_TRITONSERVER pointing at the bundle's
# tritonserver (started from this environment's python, so the stub runs this environment); wait ready; check
# embed_image, embed_text and fuse_image_text answers (`mmfuse embed`, `mmfuse fuse`: finite, L2-normalised);
# perf_analyzer closed loop on embed_image and embed_text; stop the server; the in-process bench. Writes
# OUT_DIR/gpu-check.json (also when a step fails: "ok": false and the error); exit 0 only when every step passed.
set -euo pipefail

PYTHON=${PYTHON:-python3}
PROFILE=gpu
QUICK=0
BENCH=1
DURATION_MS=""
READY_TIMEOUT=600
PA_BATCH=4
PA_CONCURRENCY=8

die() {  # the message goes to stderr and (once OUT_DIR exists) into gpu-check.json
  echo "gpu-check: error: $*" >&2
  [ -d "${OUT:-}/logs" ] && printf '%s\n' "$*" >> "$OUT/logs/error.txt"
  exit 1
}
log() { echo "gpu-check: $(date +%H:%M:%S) $*" >&2; }

ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) [ $# -ge 2 ] || die "--profile needs gpu, cpu or baseline"; PROFILE=$2; shift 2 ;;
    --profile=*) PROFILE=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    --no-bench) BENCH=0; shift ;;
    --duration) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--duration needs whole seconds"; DURATION_MS=$(( $2 * 1000 )); shift 2 ;;
    --ready-timeout) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die "--ready-timeout needs whole seconds"; READY_TIMEOUT=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
[ ${#ARGS[@]} -eq 2 ] || die "usage: gpu-check.sh BUNDLE.tar.xz OUT_DIR [--profile gpu|cpu|baseline] (see --help)"
BUNDLE=$(realpath -m "${ARGS[0]}")
OUT=$(realpath -m "${ARGS[1]}")
case "$PROFILE" in gpu|cpu|baseline) ;; *) die "--profile $PROFILE: one of gpu, cpu, baseline" ;; esac
[ -f "$BUNDLE" ] || die "bundle $BUNDLE not found"
if [ -e "$OUT" ] && { [ ! -d "$OUT" ] || [ -n "$(ls -A "$OUT")" ]; }; then
  die "$OUT exists and is not empty: give a new folder"
fi
DURATION_MS=${DURATION_MS:-$([ "$QUICK" = 1 ] && echo 3000 || echo 10000)}
command -v "$PYTHON" >/dev/null || die "PYTHON=$PYTHON not found: set PYTHON to the interpreter that has torch"
for tool in tar timeout realpath; do command -v "$tool" >/dev/null || die "$tool is not installed"; done

mkdir -p "$OUT"/{logs,parts,answers,perf}
PARTS=$OUT/parts
B=$OUT/bundle
V=$OUT/venv
REPO=$OUT/repository
SERVER_PID=""
TRITON_PID=""
T0=$(date +%s.%N)
STEP=start
: > "$PARTS/timings.tsv"

# --- bookkeeping: every step's seconds; gpu-check.json is written at exit whatever happened ---------------------
close_step() {  # the seconds of the step under way, into parts/timings.tsv
  [ -n "${STEP_T:-}" ] || return 0
  printf '%s\t%s\n' "$STEP" "$(awk -v a="$STEP_T" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')" >> "$PARTS/timings.tsv"
  STEP_T=""
}
step() {  # step NAME: close the previous step, start timing this one
  close_step
  STEP=$1; STEP_T=$(date +%s.%N)
  log "$STEP ..."
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true  # mmfuse serve forwards it to tritonserver and waits
    for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  # tritonserver leads its own process group (with the python-backend stubs): end what is left of it
  if [ -n "$TRITON_PID" ]; then
    kill -KILL -- "-$TRITON_PID" 2>/dev/null || true
  fi
  SERVER_PID=""; TRITON_PID=""
}

finish() {
  local rc=$?
  set +e
  local error=""
  [ "$rc" -eq 0 ] || error="step '$STEP' failed (exit $rc): $(tail -c 1500 "$OUT/logs/error.txt" 2>/dev/null)"
  close_step
  stop_server
  "$PYTHON" - "$OUT" "$PROFILE" "$rc" "$error" "$T0" <<'PY'
import json, os, sys, time
out, profile, rc, error, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
parts = os.path.join(out, "parts")
def part(name):
    try:  # a step that failed half-way may have left an empty or partial file
        with open(os.path.join(parts, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
timings = {}
if os.path.isfile(os.path.join(parts, "timings.tsv")):
    for line in open(os.path.join(parts, "timings.tsv")):
        name, seconds = line.rstrip("\n").split("\t")
        timings[name] = float(seconds)
timings["total"] = round(time.time() - t0, 1)
inprocess = part("inprocess")
report = {
    "ok": rc == 0,
    "error": error or None,
    "host": part("host"),
    "bundle": part("bundle"),
    "environment": part("environment"),
    "profile": profile,
    "server": part("server"),
    "answers": part("answers"),
    "perf_analyzer": part("perf"),
    "inprocess": inprocess,
    "timings_s": timings,
    "logs": os.path.join(out, "logs"),
}
with open(os.path.join(out, "gpu-check.json"), "w") as f:
    json.dump(report, f, indent=1)
    f.write("\n")
print(f"gpu-check: {'OK' if rc == 0 else 'FAILED: ' + error} -> {os.path.join(out, 'gpu-check.json')}", file=sys.stderr)
PY
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. unpack, verify ---------------------------------------------------------------------------------------------
step unpack
magic=$(head -c 6 "$BUNDLE" | od -An -tx1 | tr -d ' \n')
case "$magic" in
  fd377a585a00*) decompress=(xz -dc) ;;
  28b52ffd*) decompress=(zstd -dc) ;;
  1f8b*) decompress=(gzip -dc) ;;
  *) die "$BUNDLE is not an xz, zstd or gzip tar (magic $magic)" ;;
esac
command -v "${decompress[0]}" >/dev/null || die "${decompress[0]} is needed to unpack $BUNDLE"
mkdir -p "$OUT/unpack"
timeout 600 "${decompress[@]}" "$BUNDLE" | timeout 600 tar -xf - -C "$OUT/unpack" || die "could not unpack $BUNDLE"
[ -f "$OUT/unpack/mmfuse-gpu-bundle/MANIFEST.json" ] || die "$BUNDLE has no mmfuse-gpu-bundle/MANIFEST.json"
mv "$OUT/unpack/mmfuse-gpu-bundle" "$B" && rmdir "$OUT/unpack"
timeout 300 "$PYTHON" - "$B" "$BUNDLE" > "$PARTS/bundle.json" <<'PY' || die "the bundle does not match its MANIFEST.json"
import hashlib, json, os, sys
bundle, archive = sys.argv[1], sys.argv[2]
m = json.load(open(os.path.join(bundle, "MANIFEST.json")))
bad = [rel for rel, f in m["files"].items()
       if not os.path.isfile(os.path.join(bundle, rel))
       or hashlib.sha256(open(os.path.join(bundle, rel), "rb").read()).hexdigest() != f["sha256"]]
bad += [rel for rel in m["links"] if not os.path.exists(os.path.join(bundle, rel))]
if bad:
    sys.exit("gpu-check: missing or changed: " + ", ".join(bad[:20]))
json.dump({"path": archive, "bytes": os.path.getsize(archive), "python": m["python"], "created_utc": m["created_utc"],
           "source": m["source"], "files_verified": len(m["files"]), "wheels": len(m["wheels"])}, sys.stdout)
PY
BUNDLE_PY=$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["python"])' "$B/MANIFEST.json")

# --- 2. the host ---------------------------------------------------------------------------------------------------
step host
if command -v nvidia-smi >/dev/null; then timeout 30 nvidia-smi -L > "$OUT/logs/nvidia-smi.txt" 2>&1 || true; fi
CPU_MODEL=$( (lscpu 2>/dev/null || true) | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
timeout 300 "$PYTHON" - "$OUT/logs/nvidia-smi.txt" "$CPU_MODEL" > "$PARTS/host.json" <<'PY' \
  || die "PYTHON=$PYTHON cannot import torch and torchvision: set PYTHON to the interpreter that has them"
import json, os, platform, sys
import torch, torchvision
smi = sys.argv[1]
cuda = torch.cuda.is_available()
json.dump({
    "nvidia_smi": open(smi).read().strip().splitlines() if os.path.isfile(smi) else None,
    "cpu": sys.argv[2] or platform.processor(), "cores": os.cpu_count(),
    "python": platform.python_version(), "python_executable": sys.executable,
    "torch": torch.__version__, "torchvision": torchvision.__version__,
    "cuda_available": cuda, "torch_cuda": torch.version.cuda,
    "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    "platform": platform.platform(),
}, sys.stdout)
PY
HOST_PY=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$HOST_PY" = "$BUNDLE_PY" ] || die "the bundle is for Python $BUNDLE_PY, PYTHON=$PYTHON is $HOST_PY: build one with \
scripts/gpu-bundle.sh --python $HOST_PY, or set PYTHON"
CUDA=$("$PYTHON" -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["cuda_available"]))' "$PARTS/host.json")
if [ "$PROFILE" = gpu ] && [ "$CUDA" != 1 ]; then
  die "--profile gpu needs a CUDA GPU that torch sees (torch.cuda.is_available() is False here); on a CPU use --profile cpu or baseline"
fi

# --- 3. the environment: the host's torch + the bundle's wheels, offline -------------------------------------------
step venv
timeout 300 "$PYTHON" -m venv --system-site-packages "$V" > "$OUT/logs/venv.log" 2>&1 \
  || die "$PYTHON -m venv failed (Debian/Ubuntu: apt-get install python$HOST_PY-venv); $OUT/logs/venv.log"
# A PYTHON that is a venv (or conda env) of its own: --system-site-packages would show the *base* interpreter's
# packages, not PYTHON's, so PYTHON's site-packages go on a .pth line, after this environment's own.
HOST_SITES=$("$PYTHON" -c 'import site; print("\n".join(site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])))')
V_SITE=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$HOST_SITES" > "$V_SITE/zz_gpu_check_host_site.pth"
# Python < 3.12 seeds a venv with an old setuptools that would shadow the host's (torch asks for a recent one)
if compgen -G "$V_SITE/setuptools-*.dist-info" >/dev/null && "$PYTHON" -c 'import setuptools' 2>/dev/null; then
  timeout 120 "$V/bin/python" -m pip --isolated uninstall -y -q setuptools >> "$OUT/logs/venv.log" 2>&1 || true
fi
step install
# --isolated: no pip configuration or PIP_* variables of the host; --no-index: the bundle's wheels only.
timeout 900 "$V/bin/python" -m pip --isolated install --no-index --find-links "$B/wheels" --disable-pip-version-check \
    "$(ls "$B"/wheels/mmfuse-*.whl)[client]" "numpy==1.26.4" > "$OUT/logs/pip-install.log" 2>&1 \
  || die "pip install of the bundled wheels failed: $(tail -3 "$OUT/logs/pip-install.log")"
timeout 300 "$V/bin/python" - "$V" > "$PARTS/environment.json" <<'PY' || die "the environment is not usable (see above)"
import json, sys
import numpy, open_clip, torch, torchvision, tritonclient.grpc  # noqa: F401
import mmfuse
venv = sys.argv[1]
if int(numpy.__version__.split(".")[0]) >= 2:
    sys.exit(f"numpy {numpy.__version__} from {numpy.__file__}: Triton 2.51's python stub needs numpy<2")
if not numpy.__file__.startswith(venv):
    sys.exit(f"numpy comes from {numpy.__file__}, not from {venv}")
json.dump({"venv": venv, "python": sys.executable, "numpy": numpy.__version__, "numpy_file": numpy.__file__,
           "open_clip": open_clip.__version__, "torch": torch.__version__, "torch_file": torch.__file__,
           "mmfuse_file": mmfuse.__file__}, sys.stdout)
PY

# --- 4. tritonserver from the bundle: stub in place, libraries found ----------------------------------------------
step triton
TS=$B/triton/pytriton/tritonserver
cp "$TS/python_backend_stubs/$BUNDLE_PY/triton_python_backend_stub" "$TS/backends/python/triton_python_backend_stub"
chmod 755 "$TS/backends/python/triton_python_backend_stub"
export MMFUSE_TRITONSERVER=$TS/bin/tritonserver  # mmfuse.server.find_triton: backends at ../backends, caches beside
# The stub links libpython$BUNDLE_PY.so.1.0: the system's, or the interpreter's own LIBDIR (pyenv, conda builds).
PY_LIBDIR=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
if [ -n "$PY_LIBDIR" ] && [ -e "$PY_LIBDIR/libpython$BUNDLE_PY.so.1.0" ]; then
  export LD_LIBRARY_PATH=$PY_LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
PA_LIB=$B/perf_analyzer/lib
if command -v ldd >/dev/null; then
  for elf in "$MMFUSE_TRITONSERVER" "$TS/backends/python/libtriton_python.so" "$TS/backends/python/triton_python_backend_stub"; do
    missing=$(ldd "$elf" 2>&1 | grep "not found" || true)
    [ -z "$missing" ] || die "$elf: shared libraries not found:
$missing
(libpython$BUNDLE_PY.so.1.0: Debian/Ubuntu apt-get install libpython$BUNDLE_PY, or a Python built with --enable-shared)"
  done
  # perf_analyzer takes libssl/libcrypto 3 from the system; where they are missing, the bundle's copies serve
  for lib in libssl.so.3 libcrypto.so.3; do
    if LD_LIBRARY_PATH=$PA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ldd "$B/perf_analyzer/bin/perf_analyzer" | grep -q "$lib => not found"; then
      ln -sf "../../triton/nvidia_pytriton.libs/$(cd "$B/triton/nvidia_pytriton.libs" && ls "${lib%%.so.3}"-*.so.3)" "$PA_LIB/$lib"
    fi
  done
fi

# --- 5. the profile, the server -----------------------------------------------------------------------------------
step apply-profile
timeout 300 "$V/bin/mmfuse" apply-profile "$PROFILE" --model-repository "$B/model_repository" --out "$REPO" \
  > "$OUT/logs/apply-profile.log" 2>&1 || die "mmfuse apply-profile $PROFILE failed: $(tail -5 "$OUT/logs/apply-profile.log")"
if grep -rqs 'string_value: "openvino"' "$REPO"/*/config.pbtxt && ! "$V/bin/python" -c 'import openvino' 2>/dev/null; then
  die "profile $PROFILE runs the encoders on OpenVINO (engine: openvino), which this host lacks: pip install openvino, or use --profile baseline"
fi

step serve
read -r GRPC_PORT HTTP_PORT METRICS_PORT < <("$V/bin/python" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
"$V/bin/mmfuse" serve --model-repository "$REPO" --grpc-port "$GRPC_PORT" --http-port "$HTTP_PORT" \
    --metrics-port "$METRICS_PORT" > "$OUT/logs/server.log" 2>&1 &
SERVER_PID=$!
ready=0
deadline=$(( $(date +%s) + READY_TIMEOUT ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  kill -0 "$SERVER_PID" 2>/dev/null || die "the server exited before it was ready; $OUT/logs/server.log:
$(tail -25 "$OUT/logs/server.log")"
  [ -n "$TRITON_PID" ] || TRITON_PID=$(pgrep -P "$SERVER_PID" 2>/dev/null | head -1 || true)
  if "$V/bin/python" -c "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:$HTTP_PORT/v2/health/ready', timeout=2).status != 200)" 2>/dev/null; then
    ready=1; break
  fi
  sleep 1
done
[ "$ready" = 1 ] || die "the server was not ready after $READY_TIMEOUT s; $OUT/logs/server.log:
$(tail -25 "$OUT/logs/server.log")"
printf '{"grpc_port": %s, "http_port": %s, "metrics_port": %s, "tritonserver": "%s", "log": "%s"}' \
  "$GRPC_PORT" "$HTTP_PORT" "$METRICS_PORT" "$MMFUSE_TRITONSERVER" "$OUT/logs/server.log" > "$PARTS/server.json"

# --- 6. answers: embed_image, embed_text, fuse_image_text ---------------------------------------------------------
step answers
A=$OUT/answers
timeout 120 "$V/bin/python" - "$A" "$OUT/perf" <<'PY' || die "could not write the test inputs"
import json, sys
from pathlib import Path
import numpy as np
try:  # where mmfuse keeps perf_analyzer's input-data writer (mmfuse.eval re-exports it)
    from mmfuse.perf_analyzer import input_data
except ImportError:
    from mmfuse.eval.perf_analyzer import input_data
from mmfuse.serving.calibration import CAPTIONS, photo_like_jpeg
answers, perf = Path(sys.argv[1]), Path(sys.argv[2])
(answers / "images").mkdir(parents=True)
images = [photo_like_jpeg(640, 480, seed) for seed in range(8)]
for i, jpeg in enumerate(images):
    (answers / "images" / f"{i}.jpg").write_bytes(jpeg)
texts = list(CAPTIONS[:8])
(answers / "texts.txt").write_text("\n".join(texts) + "\n")
(answers / "pairs.jsonl").write_text("".join(json.dumps({"image": f"images/{i}.jpg", "text": t}) + "\n"
                                             for i, t in enumerate(texts)))
# perf_analyzer's --input-data: one entry per request; BYTES tensors length-prefixed, base64 (mmfuse.eval)
obj = lambda x: np.array([[x]], dtype=object)  # noqa: E731 - [batch 1, 1]
(perf / "embed_image.input.json").write_text(json.dumps(input_data([{"IMAGE": obj(j)} for j in images])))
(perf / "embed_text.input.json").write_text(json.dumps(input_data([{"TEXT": obj(t.encode())} for t in texts])))
PY
URL=127.0.0.1:$GRPC_PORT
timeout 300 "$V/bin/mmfuse" embed image "$A/images" --out "$A/embed_image.npy" --url "$URL" --no-progress \
  > "$OUT/logs/embed_image.log" 2>&1 || die "mmfuse embed image failed: $(tail -5 "$OUT/logs/embed_image.log")"
timeout 300 "$V/bin/mmfuse" embed text "$A/texts.txt" --out "$A/embed_text.npy" --url "$URL" --no-progress \
  > "$OUT/logs/embed_text.log" 2>&1 || die "mmfuse embed text failed: $(tail -5 "$OUT/logs/embed_text.log")"
timeout 300 "$V/bin/mmfuse" fuse "$A/pairs.jsonl" --out "$A/fuse_image_text.npy" --url "$URL" --no-progress \
  > "$OUT/logs/fuse.log" 2>&1 || die "mmfuse fuse failed: $(tail -5 "$OUT/logs/fuse.log")"
timeout 120 "$V/bin/python" - "$A" > "$PARTS/answers.json" <<'PY' || die "the served answers are wrong (above)"
import json, sys
from pathlib import Path
import numpy as np
answers, report, bad = Path(sys.argv[1]), {}, []
for name in ("embed_image", "embed_text", "fuse_image_text"):
    vectors = np.load(answers / f"{name}.npy")
    rows = [json.loads(line) for line in open(answers / f"{name}.rows.jsonl")]
    norms = np.linalg.norm(vectors, axis=1)
    statuses = [r["status"] if "status" in r else ",".join(f"{k}={v}" for k, v in r["modality_status"].items())
                for r in rows]
    ok = (vectors.shape[0] == len(rows) == 8 and vectors.shape[1] > 0 and bool(np.isfinite(vectors).all())
          and bool(np.allclose(norms, 1.0, atol=1e-3)) and all("ok" in s and "missing" not in s for s in statuses)
          and float(np.abs(vectors - vectors[:1]).max()) > 0)  # distinct inputs, distinct vectors
    report[name] = {"ok": ok, "rows": len(rows), "dim": int(vectors.shape[1]), "finite": bool(np.isfinite(vectors).all()),
                    "norm_min": round(float(norms.min()), 6), "norm_max": round(float(norms.max()), 6),
                    "statuses": sorted(set(statuses))}
    if not ok:
        bad.append(name)
report["ok"] = not bad
json.dump(report, sys.stdout)
if bad:
    sys.exit(f"gpu-check: wrong answers from {', '.join(bad)}: {json.dumps(report)}")
PY

# --- 7. perf_analyzer, closed loop ----------------------------------------------------------------------------------
for ensemble in embed_image embed_text; do
  step "perf_analyzer $ensemble"
  timeout 600 env LD_LIBRARY_PATH="$PA_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$B/perf_analyzer/bin/perf_analyzer" \
      -m "$ensemble" -i grpc -u "$URL" --input-data "$OUT/perf/$ensemble.input.json" -b "$PA_BATCH" \
      --concurrency-range "$PA_CONCURRENCY" --measurement-mode time_windows --measurement-interval "$DURATION_MS" \
      --max-trials 6 --stability-percentage 50 --percentile 99 -f "$OUT/perf/$ensemble.csv" \
      > "$OUT/logs/perf_analyzer-$ensemble.log" 2>&1 \
    || die "perf_analyzer on $ensemble failed: $(tail -5 "$OUT/logs/perf_analyzer-$ensemble.log")"
done
"$V/bin/python" - "$OUT/perf" "$PA_BATCH" "$PA_CONCURRENCY" "$DURATION_MS" > "$PARTS/perf.json" <<'PY'
import csv, json, sys
from pathlib import Path
folder, batch, concurrency, window_ms = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {"mode": "closed loop", "batch": batch, "concurrency": concurrency, "window_ms": window_ms}
for ensemble in ("embed_image", "embed_text"):
    [row] = list(csv.DictReader(open(folder / f"{ensemble}.csv")))
    us = lambda key: float(row[key]) / 1000  # noqa: E731 - microseconds -> ms
    out[ensemble] = {"items_per_s": float(row["Inferences/Second"]),
                     "requests_per_s": round(float(row["Inferences/Second"]) / batch, 2),
                     "p50_ms": us("p50 latency"), "p90_ms": us("p90 latency"), "p99_ms": us("p99 latency"),
                     "csv": str(folder / f"{ensemble}.csv")}
json.dump(out, sys.stdout)
PY
stop_server  # the in-process half measures the same towers without the server competing for the machine

# --- 8. the in-process half -----------------------------------------------------------------------------------------
if [ "$BENCH" = 1 ]; then
  step inprocess
  quick=(); [ "$QUICK" = 1 ] && quick=(--quick)
  if [ "$CUDA" = 1 ]; then
    timeout 3600 "$V/bin/python" -m mmfuse.bench --gpu "$OUT/inprocess.json" "${quick[@]}" > "$OUT/logs/inprocess.log" 2>&1 \
      || die "python -m mmfuse.bench --gpu failed: $(tail -5 "$OUT/logs/inprocess.log")"
    kind="python -m mmfuse.bench --gpu (cuda)"
  else
    bench_profile=$PROFILE; [ "$PROFILE" = gpu ] && bench_profile=baseline
    timeout 3600 "$V/bin/mmfuse" bench --no-served --profile "$bench_profile" "${quick[@]}" --out "$OUT/inprocess.json" \
        > "$OUT/logs/inprocess.log" 2>&1 || die "mmfuse bench --no-served failed: $(tail -5 "$OUT/logs/inprocess.log")"
    kind="mmfuse bench --no-served --profile $bench_profile (no CUDA: CPU)"
  fi
  printf '{"path": "%s", "command": "%s", "quick": %s}' "$OUT/inprocess.json" "$kind" \
    "$([ "$QUICK" = 1 ] && echo true || echo false)" > "$PARTS/inprocess.json"
else
  printf '{"path": null, "skipped": "--no-bench"}' > "$PARTS/inprocess.json"
fi
close_step
