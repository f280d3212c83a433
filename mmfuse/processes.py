"""Everything mmfuse reads from /proc (Linux), in one place: a running tritonserver's processes (the stub
watchdog, the tests), their memory and CPU time (``mmfuse bench``, ``mmfuse eval``), the pid listening on a
port, and the machine's CPU and memory.

Each Python-backend model instance runs in its own ``triton_python_backend_stub`` child process of
tritonserver; its command line ends with ``<instance name> <kind>``, e.g. ``text_encoder_0_0 DEFAULT``.
A stub that died and was not reaped shows up as a zombie child with an empty command line.

Every reader tolerates processes that end while it reads (their figures count as 0, or the reader
returns None where a partial sum would mislead).
"""
from __future__ import annotations

import os
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
        except OSError:  # the thread or the process ended
            continue
    return sorted(set(out))


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (tritonserver and its python-backend stubs)."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children(p))
    return out


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


def _kib_field(path: str, key: str) -> int | None:
    """A ``Key:   N kB`` line of a /proc file, in bytes (None if the file or the line is missing)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS), 0 if it is gone."""
    return _kib_field(f"/proc/{pid}/status", "VmRSS:") or 0


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (a sum of RSS: shared pages count once per process)."""
    return sum(rss_bytes(p) for p in tree(pid))


def tree_pss_bytes(pid: int) -> int | None:
    """Proportional set size of a process tree (each shared page split between the processes that map it);
    None if a process's ``smaps_rollup`` cannot be read."""
    total = 0
    for p in tree(pid):
        pss = _kib_field(f"/proc/{p}/smaps_rollup", "Pss:")
        if pss is None:
            return None
        total += pss
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime after "(comm)"


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants (tritonserver and its stubs)."""
    return sum(cpu_seconds(p) for p in tree(pid))


def pid_listening_on(port: int) -> int | None:
    """The pid listening on TCP ``port`` (any local address; only processes whose /proc we may read)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state_, inode = parts[1], parts[3], parts[9]
            if state_ == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(inode)
    if not inodes:
        return None
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    return None


def cpu_model_and_flags() -> tuple[str | None, set[str]]:
    """The CPU's model name and feature flags from /proc/cpuinfo (None and an empty set where unreadable)."""
    from .serving.hardware import cpu_model_and_flags as read

    model, flags = read()
    return model, set(flags)


def memory_total_bytes() -> int | None:
    """The machine's memory (MemTotal)."""
    return _kib_field("/proc/meminfo", "MemTotal:")


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded (empty where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def memory(server_pid: int) -> dict[str, int]:
    """RSS of tritonserver and of each stub, by name."""
    out = {"tritonserver": rss_bytes(server_pid)}
    for stub in stubs(server_pid).values():
        out[stub.instance] = rss_bytes(stub.pid)
    return out
