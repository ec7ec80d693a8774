"""``fedsynth server``: the coordinator's side of a real deployment.

Starts ``flower-superlink`` with TLS and SuperNode authentication (``--enable-supernode-auth``; no
``uv sync`` per run), registers the hospitals' public keys, submits a run of this Flower app with the given
run config (``flwr run APP fedsynth --run-config FILE --stream``), streams its log, and stops the SuperLink at
the end. The ServerApp writes the same run folder as a simulation (``OUT/RUN_ID/``).

The ``flwr`` CLI finds SuperLinks by name in ``$FLWR_HOME/config.toml`` (default ``~/.flwr``): this module
gives it a private ``FLWR_HOME`` (``OUT/.flwr`` unless told otherwise) holding one connection, ``fedsynth``,
so the user's own ``~/.flwr`` is never touched. The SuperLink installs each run's app under the same folder.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import tomli_w
from cryptography import x509

from .certs import CertError, CertPaths, check_chain, load_node_public
from .config import RunConfig
from .files import atomic_write
from .processes import child_env, exit_on_sigterm, flower_tool, start_group, stop_group, tail, wait_for_port

CONNECTION = "fedsynth"  # the SuperLink connection's name in the private FLWR_HOME
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
APP_DIR = Path(__file__).resolve().parent.parent  # the project folder: pyproject.toml with [tool.flwr.app]


@dataclass
class Deployment:
    certs: Path                      # the folder `fedsynth certs` wrote
    host: str = "0.0.0.0"            # where the SuperLink listens
    port: int = 9092                 # its one HTTPS port (Fleet, Control and Runtime APIs)
    public_keys: list[Path] = field(default_factory=list)  # default: every CERTS/hospitals/*/node.pub
    flwr_home: Path | None = None    # default: OUT/.flwr
    app_dir: Path = APP_DIR
    keep_superlink: bool = False
    start_timeout: float = 60.0

    @property
    def paths(self) -> CertPaths:
        return CertPaths(Path(self.certs))

    def keys(self) -> list[Path]:
        return [Path(p) for p in self.public_keys] or self.paths.node_pubs()


def check_deployment(dep: Deployment) -> tuple[x509.Certificate, list[tuple[str, Path]]]:
    """Everything the SuperLink needs, checked before anything starts: the files exist, the server certificate
    chains to the CA, every public key is a Flower-usable ECDSA key, the app folder is a Flower app."""
    p = dep.paths
    for f in (p.ca_cert, p.server_cert, p.server_key):
        if not f.is_file():
            raise CertError(f"{f}: missing; create it with `fedsynth certs {dep.certs} --dns NAME --ip ADDRESS`")
    cert = check_chain(p.server_cert, p.ca_cert)
    keys = dep.keys()
    if not keys:
        raise CertError(f"no hospital keys: {p.root / 'hospitals'} holds no */node.pub and no --register was "
                        "given; create them with `fedsynth certs DIR --hospital NAME`")
    named = []
    for key in keys:
        load_node_public(key)
        named.append((key.parent.name if key.name == "node.pub" else key.stem, key))
    if len({n for n, _ in named}) != len(named):
        raise CertError(f"two hospital keys share a name: {[str(k) for _, k in named]}")
    pyproject = Path(dep.app_dir) / "pyproject.toml"
    if "[tool.flwr.app]" not in (pyproject.read_text() if pyproject.is_file() else ""):
        raise ValueError(f"{pyproject}: not a Flower app (no [tool.flwr.app]); pass the fedsynth project folder")
    return cert, named


def control_address(host: str, port: int, cert: x509.Certificate) -> str:
    """The address this machine's ``flwr`` CLI uses to reach the SuperLink: a name the certificate covers."""
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(n) for n in sans.get_values_for_type(x509.DNSName)] + \
            [str(a) for a in sans.get_values_for_type(x509.IPAddress)]
    if host in names:
        target = host
    elif host in ("0.0.0.0", "::", *LOCAL_NAMES) and any(n in LOCAL_NAMES for n in names):
        target = next(n for n in names if n in LOCAL_NAMES)
    else:
        target = names[0]  # the coordinator reaches its own SuperLink under its public name
    return f"[{target}]:{port}" if ":" in target else f"{target}:{port}"


def write_flwr_config(flwr_home: Path, address: str, ca_cert: Path) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.chmod(flwr_home, 0o700)
    config = {"superlink": {"default": CONNECTION,
                            CONNECTION: {"address": address, "root-certificates": str(Path(ca_cert).resolve())}}}
    atomic_write(flwr_home / "config.toml", tomli_w.dumps(config).encode(), 0o600)


def flwr_env(flwr_home: Path) -> dict[str, str]:
    return child_env(FLWR_HOME=str(flwr_home))


def register(flwr_home: Path, name: str, key: Path) -> int | None:
    """``flwr supernode register``: the SuperLink admits the holder of this key from now on."""
    res = subprocess.run([flower_tool("flwr"), "supernode", "register", str(key), CONNECTION, "--name", name,
                          "--format", "json"], env=flwr_env(flwr_home), capture_output=True, text=True)
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
    except ValueError:
        out = {}
    if "Public key already in use" in out.get("error-message", ""):
        return None  # registered before: the SuperLink's database (--database) outlived a restart
    if res.returncode != 0 or not out.get("success"):
        raise RuntimeError(f"registering {key} ({name}) failed: {(res.stdout + res.stderr).strip()[-800:]}")
    return int(out["node-id"])


def run_status(flwr_home: Path, run_id: int) -> str:
    res = subprocess.run([flower_tool("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                         env=flwr_env(flwr_home), capture_output=True, text=True)
    try:
        runs = json.loads(res.stdout[res.stdout.index("{"):]).get("runs", [])
        return str(runs[0]["status"])
    except (ValueError, LookupError, KeyError):
        return "unknown"


def serve(run: RunConfig, dep: Deployment, out: IO[str] | None = None, resume: bool = False) -> Path:
    """Start the SuperLink, register the hospitals, run the federation to its end; returns the run folder.
    ``resume``: continue ``run`` from its run folder's last complete checkpoint (after the server was killed);
    the hospitals' SuperNodes keep retrying the SuperLink meanwhile and re-send an update already charged."""
    out = out or sys.stdout
    exit_on_sigterm()  # `kill PID` still runs the finally below, which stops the SuperLink
    cert, hospitals = check_deployment(dep)
    run = run.replace(out_dir=str(Path(run.out_dir).resolve()))
    run_config = app_run_config(run, Path(dep.app_dir) / "pyproject.toml")  # before anything starts
    if resume:
        run_config["resume"] = True  # declared in pyproject beside the RunConfig keys; read by the ServerApp
    flwr_home = Path(dep.flwr_home or Path(run.out_dir) / ".flwr").resolve()
    address = control_address(dep.host, dep.port, cert)
    write_flwr_config(flwr_home, address, dep.paths.ca_cert)
    p = dep.paths
    log_path = flwr_home / "superlink.log"
    cmd = [flower_tool("flower-superlink"), "--ssl-certfile", str(p.server_cert), "--ssl-keyfile", str(p.server_key),
           "--ssl-ca-certfile", str(p.ca_cert), "--enable-supernode-auth", "--disable-runtime-dependency-installation",
           "--host", dep.host, "--port", str(dep.port),
           # State on disk, not in memory: after a restart (--resume) the SuperLink still knows the hospitals'
           # nodes, so their SuperNodes' heartbeats are not refused (401) and they carry on without a restart.
           "--database", str(flwr_home / "superlink.db")]
    print(f"starting the SuperLink on {dep.host}:{dep.port} (TLS, SuperNode authentication); log: {log_path}",
          file=out, flush=True)
    with open(log_path, "ab") as log:
        superlink = start_group(cmd, log, env=flwr_env(flwr_home))
    try:
        try:
            wait_for_port(address.rsplit(":", 1)[0].strip("[]"), dep.port, superlink, dep.start_timeout,
                          "flower-superlink")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; last lines of {log_path}:\n{tail(log_path)}") from None
        for name, key in hospitals:
            node_id = register(flwr_home, name, key)
            print(f"registered {name} ({key}) as SuperNode {node_id}" if node_id is not None else
                  f"registered {name} ({key}) (already, in the SuperLink's database)", file=out, flush=True)
        run_dir = submit(run, run_config, dep, flwr_home, out)
    finally:
        if dep.keep_superlink and superlink.poll() is None:
            print(f"the SuperLink keeps running (pid {superlink.pid}); use `FLWR_HOME={flwr_home} flwr ls "
                  f"{CONNECTION}`, stop it with `kill -TERM -{superlink.pid}`", file=out, flush=True)
        else:
            stop_group(superlink)
            print("SuperLink stopped", file=out, flush=True)
    return run_dir


def app_run_config(run: RunConfig, pyproject: Path) -> dict:
    """The run config as ``flwr run --run-config`` takes it: only keys the app declares in
    ``[tool.flwr.app.config]`` (Flower rejects others); a non-default value for an undeclared key is an error."""
    declared = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"].get("config", {})
    values, defaults = run.to_flower(), RunConfig().to_flower()
    lost = sorted(k for k in values if k not in declared and values[k] != defaults[k])
    if lost:
        raise ValueError(f"{pyproject}: [tool.flwr.app.config] does not declare {lost}, so a deployed run can't "
                         "carry them; add them there")
    return {k: v for k, v in values.items() if k in declared}


def submit(run: RunConfig, run_config: dict, dep: Deployment, flwr_home: Path, out: IO[str]) -> Path:
    """``flwr run APP fedsynth --run-config FILE --stream``, echoing its log; fails unless the run completed and
    left its run folder."""
    config_file = flwr_home / f"run-config-{run.run_id}.toml"
    atomic_write(config_file, tomli_w.dumps(run_config).encode())
    print(f"waiting for {run.sites} hospitals, then {run.rounds} rounds of {run.model} "
          f"(ε={run.epsilon:g}, δ={run.delta:g}, secure aggregation {'on' if run.secure else 'off'})",
          file=out, flush=True)
    cmd = [flower_tool("flwr"), "run", str(dep.app_dir), CONNECTION, "--run-config", str(config_file), "--stream"]
    proc = subprocess.Popen(cmd, env=flwr_env(flwr_home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    flower_run = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
            match = re.search(r"started run (\d+)", line)
            flower_run = int(match.group(1)) if match and flower_run is None else flower_run
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: stop streaming (the run itself stops with the SuperLink)
            stop_group(proc, grace=5)
    status = run_status(flwr_home, flower_run) if flower_run is not None else "not started"
    for _ in range(20):  # the stream can end a moment before the run's final status is recorded
        if status.startswith("finished") or flower_run is None:
            break
        time.sleep(0.5)
        status = run_status(flwr_home, flower_run)
    run_dir = run.run_dir
    if proc.returncode != 0 or status != "finished:completed" or not (run_dir / "weights.safetensors").is_file():
        raise RuntimeError(f"the run did not complete (flwr run exit {proc.returncode}, Flower run "
                           f"{flower_run}: {status}); run folder {run_dir} "
                           f"{'exists' if run_dir.exists() else 'missing'}")
    return run_dir
