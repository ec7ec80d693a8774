"""Child processes of a deployment (flower-superlink, flower-supernode, flwr): started in their own process
group, so stopping one also stops what it spawned (SuperExec, ServerApp and ClientApp processes)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Sequence


def flower_tool(name: str) -> str:
    """The Flower executable installed beside this Python (a venv's bin/), else whatever PATH finds."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else name


def child_env(**extra: str) -> dict[str, str]:
    """This environment with this Python's bin/ first on PATH: flower-superlink and flower-supernode start
    flower-superexec, flwr-serverapp and flwr-clientapp by name."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **extra}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_group(cmd: Sequence[str], log: IO[bytes] | None, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` as the leader of a new session/process group; output goes to ``log`` (None: inherit)."""
    return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            env=env, cwd=cwd, start_new_session=True)


def stop_group(proc: subprocess.Popen, grace: float = 15.0) -> int | None:
    """SIGTERM the process group (Flower shuts down cleanly on it), SIGKILL whatever is left after ``grace`` —
    in the group, and in the groups its descendants started (a fedsynth command's SuperLink or SuperNode)."""
    groups = descendant_groups(proc.pid)
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for pgid in [proc.pid, *groups]:  # the leader may be gone while its children linger
        _signal_group(pgid, signal.SIGKILL)
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None


def descendant_groups(pid: int) -> set[int]:
    """Process groups of ``pid``'s descendants other than its own (Linux /proc; empty elsewhere)."""
    parents: dict[int, tuple[int, int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = (int(fields[1]), int(fields[2]))  # ppid, pgrp
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, (ppid, _) in parents.items() if ppid in frontier} - found
        found |= frontier
    own = parents.get(pid, (0, pid))[1]
    return {parents[p][1] for p in found if p in parents and parents[p][1] not in (own, os.getpgrp())}


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``finally`` blocks stop the child process groups (``kill PID`` on the
    fedsynth process must not leave a SuperLink or SuperNode running)."""
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Block until ``host:port`` accepts TCP connections; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
