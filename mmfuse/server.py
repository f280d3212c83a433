"""Run a real tritonserver without Docker.

The binary comes from the nvidia-pytriton wheel (Triton 2.51 with the python
backend), installed with --no-deps: only its files are used, never pytriton's
Python API. ``MMFUSE_TRITONSERVER`` may point at another tritonserver binary
(for example ``/opt/tritonserver/bin/tritonserver`` in NGC images), with
``MMFUSE_BACKEND_DIR`` for its backends.

Every mmfuse model runs the ``mmfuse`` backend, a Python-based Triton backend:
``<backend directory>/mmfuse/model.py`` is mmfuse/serving/triton_model.py, put in
place by ``find_triton`` (``MMFUSE_BACKEND_DIR`` of an NGC image: by its Dockerfile).

Two traps handled here (see shared notes): the python-backend stub for the
running CPython must sit next to ``libtriton_python.so``, and the stub embeds
CPython and ignores PYTHONPATH, so the server is started with this
interpreter's ``bin/`` first on PATH, which makes the stub use this
environment's site-packages (numpy<2, torch, open_clip, mmfuse).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .paths import DEFAULT_MODEL_REPOSITORY

#: The Python-based Triton backend every mmfuse model names (``backend: "mmfuse"``).
BACKEND_NAME = "mmfuse"


class ServerError(RuntimeError):
    """tritonserver could not be found, started, or did not become ready."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path

    @property
    def cache_dir(self) -> Path:
        """Where the response cache implementations are (``caches/local/libtritoncache_local.so``)."""
        return Path(os.environ.get("MMFUSE_CACHE_DIR", self.backend_dir.parent / "caches"))


def find_triton() -> TritonInstall:
    """Locate tritonserver and its backends; put the python stub in place if needed."""
    env_binary = os.environ.get("MMFUSE_TRITONSERVER")
    if env_binary:
        binary = Path(env_binary)
        backend_dir = Path(os.environ.get("MMFUSE_BACKEND_DIR", binary.parent.parent / "backends"))
        if not binary.is_file():
            raise ServerError(f"MMFUSE_TRITONSERVER={env_binary} is not a file")
        install_backend(backend_dir)
        return TritonInstall(binary, backend_dir)
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "tritonserver not found: install mmfuse with its server extra (`pip install 'mmfuse[server]'`: the "
            "nvidia-pytriton wheel carries Triton 2.51), or set MMFUSE_TRITONSERVER to a tritonserver binary"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    install = TritonInstall(root / "bin" / "tritonserver", root / "backends")
    if not install.binary.is_file():
        raise ServerError(f"{install.binary} is missing: reinstall nvidia-pytriton")
    _ensure_python_stub(root)
    install_backend(install.backend_dir)
    return install


def backend_model_file() -> Path:
    """The mmfuse backend's model.py as this installation ships it."""
    from .serving import triton_model_path

    return triton_model_path()


def install_backend(backend_dir: Path) -> Path:
    """Put the mmfuse backend (``<backend_dir>/mmfuse/model.py``) in place; return its path.

    Rewritten only when it differs from this installation's, so that a server always runs the handlers
    of the mmfuse it was started from. A read-only backend directory that already has it is left alone.
    """
    target = Path(backend_dir) / BACKEND_NAME / "model.py"
    source = backend_model_file().read_bytes()
    if target.is_file() and target.read_bytes() == source:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source)
    except OSError as error:
        if not target.is_file():
            raise ServerError(f"cannot install the mmfuse backend at {target}: {error}; copy "
                              f"{backend_model_file()} there") from None
    return target


def _ensure_python_stub(root: Path) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    target = root / "backends" / "python" / "triton_python_backend_stub"
    if not source.is_file():
        raise ServerError(f"no python-backend stub for Python {version} in {source.parent.parent}")
    if not target.is_file() or target.stat().st_size != source.stat().st_size:
        shutil.copy2(source, target)
        target.chmod(0o755)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class TLSConfig:
    """gRPC TLS for tritonserver. ``mutual``: clients must present a certificate signed by ``ca``."""

    cert: Path
    key: Path
    ca: Path | None = None
    mutual: bool = False

    def args(self) -> list[str]:
        for path in (self.cert, self.key, self.ca):
            if path is not None and not Path(path).is_file():
                raise ServerError(f"TLS file {path} does not exist")
        if self.mutual and self.ca is None:
            raise ServerError("mutual TLS needs a CA certificate (--tls-ca)")
        args = ["--grpc-use-ssl=true", f"--grpc-server-cert={self.cert}", f"--grpc-server-key={self.key}"]
        if self.ca is not None:
            args.append(f"--grpc-root-cert={self.ca}")
        if self.mutual:
            args.append("--grpc-use-ssl-mutual=true")
        return args


@dataclass
class ServerConfig:
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    model_control_mode: str = "none"  # none | explicit | poll
    load_models: Sequence[str] = ()  # with explicit mode; empty = all ("*")
    log_verbose: int = 0
    host: str = "0.0.0.0"  # the address every endpoint listens on
    tls: TLSConfig | None = None
    # Triton's local response cache, in bytes (0: off). Models opt in with `response_cache { enable: true }`.
    response_cache_bytes: int = 0
    extra_args: Sequence[str] = field(default_factory=tuple)

    @classmethod
    def on_free_ports(cls, **kwargs) -> ServerConfig:
        """Free ports on the loopback interface only (tests, demo, benchmarks)."""
        kwargs.setdefault("host", "127.0.0.1")
        return cls(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), **kwargs)

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.binary),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={install.backend_dir}",
            f"--grpc-address={self.host}",
            f"--http-address={self.host}",
            f"--metrics-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control_mode}",
            f"--log-verbose={self.log_verbose}",
            "--strict-readiness=true",
            "--exit-on-error=true",
        ]
        if self.model_control_mode == "explicit":
            for name in self.load_models or ("*",):
                cmd.append(f"--load-model={name}")
        if self.tls is not None:
            cmd += self.tls.args()
        if self.response_cache_bytes > 0:
            cmd += [f"--cache-directory={install.cache_dir}", f"--cache-config=local,size={int(self.response_cache_bytes)}"]
        return cmd + list(self.extra_args)


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return env


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started tritonserver dies (Linux), so that a
    killed `mmfuse serve`, demo or test never leaves a server (and its model processes) behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def is_ready(http_port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class TritonServer:
    """A tritonserver child process: ``with TritonServer(cfg) as server: ...`` starts, waits, stops."""

    def __init__(self, config: ServerConfig, log_path: Path | None = None):
        self.config = config
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.config.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.config.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.config.metrics_port}/metrics"

    def start(self) -> TritonServer:
        install = find_triton()
        cmd = self.config.command(install)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            cmd, env=server_env(), stdout=self._log_file, stderr=subprocess.STDOUT if self._log_file else None,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} before it was ready"
                                  + self._log_hint())
            if is_ready(self.config.http_port):
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s" + self._log_hint())

    def _log_hint(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").splitlines()[-40:]
        return f"; log {self.log_path}:\n" + "\n".join(tail)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # The python-backend stubs share the server's process group; after a crash or a hung exit
        # they would outlive it (and keep their memory): end whatever is left of the group.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.process.returncode

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class StubWatchdog(threading.Thread):
    """Brings back Python models whose process died.

    Triton 2.51 does not restart a python-backend stub that dies (killed, out of memory): every
    request to that model then fails, while the model and the server keep reporting ready. Every
    ``interval`` seconds the watchdog looks at tritonserver's children; when a stub it knew is gone
    (a zombie, or vanished while its model is still listed as ready) it reloads that model through
    the repository API (explicit model control), which starts a new stub. In the other control modes
    Triton cannot reload a single model, so the watchdog stops the server instead (exit code 3),
    for the supervisor (compose, Kubernetes) to restart it: an honest failure instead of a ready
    server that cannot answer.
    """

    def __init__(self, server: TritonServer, interval: float = 2.0):
        super().__init__(name="mmfuse-stub-watchdog", daemon=True)
        self.server = server
        self.interval = interval
        self.stop_event = threading.Event()
        self.known: dict[int, str] = {}  # pid -> model
        self.recoveries: list[str] = []
        self.gave_up = False

    def _reload(self, model: str) -> bool:
        """Unload and load the model again (a load of an unchanged, loaded model is a no-op in Triton)."""
        base = f"http://127.0.0.1:{self.server.config.http_port}/v2/repository/models/{model}"
        try:
            for action in ("unload", "load"):
                request = urllib.request.Request(f"{base}/{action}", data=b"{}", method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=300) as r:
                    if r.status != 200:
                        return False
            return True
        except (urllib.error.URLError, OSError):
            return False

    def check(self) -> list[str]:
        """One look; returns the models found dead (and recovered or not)."""
        from . import processes

        pid = self.server.process.pid
        # Instance stubs only ("<model>_<group>_<index>"); a model-level stub that Triton starts to
        # complete a config is ended by Triton itself.
        live = {stub.pid: stub.model for stub in processes.stubs(pid).values() if stub.is_instance}
        if not is_ready(self.server.config.http_port):
            self.known.update(live)  # remember them; act once the server is up
            return []
        dead_pids = set(processes.zombies(pid)) | (set(self.known) - set(live) - set(processes.children(pid)))
        dead = sorted({self.known[p] for p in dead_pids if p in self.known})
        for model in dead:
            print(f"mmfuse: the process of model '{model}' died; "
                  + ("reloading it" if self.server.config.model_control_mode == "explicit" else
                     "stopping the server (exit 3) so that it is restarted"), file=sys.stderr, flush=True)
            if self.server.config.model_control_mode == "explicit" and self._reload(model):
                self.recoveries.append(model)
                continue
            self.gave_up = True
            self.server.process.send_signal(signal.SIGTERM)
            break
        self.known = {p: m for p, m in {**self.known, **live}.items() if p in live}
        return dead

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            if self.server.process.poll() is not None:
                return
            try:
                self.check()
            except Exception as error:  # noqa: BLE001 - the watchdog must never take the server down
                print(f"mmfuse: stub watchdog: {error}", file=sys.stderr)


def serve_foreground(config: ServerConfig, watchdog: bool = True) -> int:
    """``mmfuse serve``: run tritonserver in the foreground; SIGTERM/SIGINT stop it cleanly."""
    server = TritonServer(config).start()
    assert server.process is not None

    def forward(signum, _frame):
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    dog = StubWatchdog(server) if watchdog and sys.platform.startswith("linux") else None
    if dog is not None:
        dog.start()
    code = server.process.wait()
    if dog is not None:
        dog.stop_event.set()
        if dog.gave_up:
            return 3
    return 0 if code in (0, -signal.SIGTERM) else code
