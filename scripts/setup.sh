#!/usr/bin/env bash
# Create .venv in the checkout and install everything mmfuse needs, from the project's own files.
# Idempotent: a stamp file skips the work when nothing changed. Used by `make setup|demo|test`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.mmfuse-setup
inputs_hash=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$inputs_hash" ] && [ -x "$VENV/bin/mmfuse" ]; then
  exit 0
fi

pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
echo "mmfuse setup: Python $pyver, creating $VENV ..."
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt)

# torch and torchvision must be a matching pair (open_clip imports torchvision).
case "$(uname -m)" in
  aarch64) torch_pins=(torch==2.9.1 torchvision==0.24.1) ;;
  *) torch_pins=(torch==2.14.1 torchvision==0.29.1) ;;
esac
echo "mmfuse setup: installing ${torch_pins[*]} ..."
"${PIP[@]}" "${torch_pins[@]}" 2>&1 | grep -vE "^WARNING: Location|^Requirement already" || true
"$VENV/bin/python" -c 'import torch, torchvision' >/dev/null

# Every extra: [server] brings the real tritonserver 2.51 (the nvidia-pytriton wheel carries it; only its
# binary and python backend are used, never pytriton's Python API), [client] the gRPC clients, [tools] the
# benchmarks and evaluation, [test] the test suite and the linter.
echo "mmfuse setup: installing mmfuse (editable) with its extras server, tools, test, int8 ..."
"${PIP[@]}" -e ".[server,tools,test,int8]" 2>&1 | grep -vE "^WARNING: Location|^Requirement already" || true

# OpenVINO's runtime, for the encoders' `engine: openvino`. --no-deps: its one other dependency,
# openvino-telemetry, makes model conversion report usage over the network (and write ~/intel); without
# it OpenVINO falls back to its built-in no-op stub. numpy comes from the constraints above.
echo "mmfuse setup: installing openvino (--no-deps) ..."
"${PIP[@]}" --no-deps openvino==2026.4.1 2>&1 | grep -vE "^WARNING: Location|^Requirement already" || true
# NNCF, for precision int8 (post-training quantisation); its dependencies came with the [int8] extra.
echo "mmfuse setup: installing nncf (--no-deps) ..."
"${PIP[@]}" --no-deps nncf==3.4.0 2>&1 | grep -vE "^WARNING: Location|^Requirement already" || true

# The python-backend stub embeds the system's libpython (Debian: libpython3.X).
if ! ldconfig -p | grep -q "libpython${pyver}.so.1.0"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "mmfuse setup: installing libpython${pyver} for the python-backend stub ..."
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "libpython${pyver}" >/dev/null
  else
    echo "mmfuse setup: WARNING: libpython${pyver}.so.1.0 not found; the python backend stub needs it" >&2
  fi
fi

# Check the pieces that cost hours when wrong.
"$VENV/bin/python" - <<'PY'
import nncf, numpy, open_clip, openvino, torch, tritonclient.grpc  # noqa: F401
from mmfuse.server import find_triton
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__version__}: Triton 2.51's stub needs numpy<2"
install = find_triton()
from mmfuse.perf_analyzer import find_perf_analyzer, library_dir  # the load generator and its two libraries
print(f"mmfuse setup: perf_analyzer {find_perf_analyzer()} (libraries linked in {library_dir()})")
print(f"mmfuse setup: ok (torch {torch.__version__}, open_clip {open_clip.__version__}, numpy {numpy.__version__}, "
      f"tritonserver {install.binary})")
PY
echo "$inputs_hash" > "$STAMP"
