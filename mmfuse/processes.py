"""What a running tritonserver's processes look like, read from /proc (Linux): used by the stub watchdog and the tests.

Each Python-backend model instance runs in its own ``triton_python_backend_stub`` child process of
tritonserver; its command line ends with ``<instance name> <kind>``, e.g. ``text_encoder_0_0 DEFAULT``.
A stub that died and was not reaped shows up as a zombie child with an empty command line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    instance: str  # e.g. text_encoder_0_0
    pid: int

    @property
    def is_instance(self) -> bool:
        """A model instance's stub ("<model>_<group>_<index>"), not a short-lived model-level one."""
        parts = self.instance.rsplit("_", 2)
        return len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit()

    @property
    def model(self) -> str:
        return self.instance.rsplit("_", 2)[0] if self.is_instance else self.instance


def children(pid: int) -> list[int]:
    """Child processes of every thread of ``pid`` (tritonserver starts stubs from several threads)."""
    out: list[int] = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(set(out))


def state(pid: int) -> str:
    """One-letter process state (R, S, D, Z, ...), or "" if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return ""


def stubs(server_pid: int) -> dict[str, Stub]:
    """Live python-backend stubs of a tritonserver, by instance name."""
    out = {}
    for pid in children(server_pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if len(args) > 3 and args[0].endswith(STUB.encode()) and state(pid) not in ("Z", ""):
            instance = args[-3].decode()
            out[instance] = Stub(instance, pid)
    return out


def zombies(server_pid: int) -> list[int]:
    """Children that died and were not reaped (a dead stub that Triton did not restart)."""
    return [pid for pid in children(server_pid) if state(pid) == "Z"]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def memory(server_pid: int) -> dict[str, int]:
    """RSS of tritonserver and of each stub, by name."""
    out = {"tritonserver": rss_bytes(server_pid)}
    for stub in stubs(server_pid).values():
        out[stub.instance] = rss_bytes(stub.pid)
    return out
