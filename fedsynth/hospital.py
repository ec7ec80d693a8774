"""``fedsynth client``: what a hospital runs next to its imaging data.

First a local dry run that contacts no one: the site's data, ledger and policy are read exactly as the
ClientApp will read them (``client.site.SiteConfig.from_node_config`` with the deployment keys), and the
hospital sees what would be trained and how much of its privacy budget is left. Anything unusable stops
here with an error naming the file and the field. Then ``flower-supernode`` starts with TLS (the
coordinator's CA), the hospital's node key, and a node config built from the same options.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, IO

import numpy as np
import tomli_w
from cryptography import x509

from .certs import CertError, load_cert, load_node_private
from .config import RunConfig, resolve_device
from .files import atomic_write
from .processes import child_env, exit_on_sigterm, flower_tool, start_group, stop_group


@dataclass
class Hospital:
    data: Path
    site_name: str = ""
    ledger: Path | None = None        # default: ledger.jsonl beside the data
    ledger_key: Path | None = None    # default: site.key beside the ledger
    policy: dict[str, Any] | None = None  # policy keys (max-epsilon, ...) given on the command line
    policy_file: Path | None = None
    device: str | None = None         # where this hospital trains (auto | cpu | cuda[:N]); default: the run's

    def node_config(self) -> dict[str, Any]:
        """The SuperNode's node config: what ``client.site.SiteConfig.from_node_config`` reads."""
        data = Path(self.data).resolve()
        config: dict[str, Any] = {"data-path": str(data), "site-name": self.site_name or data.stem,
                                  "ledger-path": str(Path(self.ledger or data.parent / "ledger.jsonl").resolve())}
        if self.ledger_key:
            config["ledger-key"] = str(Path(self.ledger_key).resolve())
        if self.policy_file:
            config["policy-file"] = str(Path(self.policy_file).resolve())
        if self.device:
            config["device"] = self.device
        config.update({k: v for k, v in (self.policy or {}).items() if v is not None})
        return config


def dry_run(hospital: Hospital, resolution: int = RunConfig.resolution) -> str:
    """What this site would train and the budget it has left, from local files only; raises on anything the
    ClientApp would refuse (unreadable data, a policy that can't be met, a ledger that doesn't verify)."""
    from client.site import Site, SiteConfig  # torch and Opacus: imported only when a site is opened
    from models import FAMILIES
    from privacy.verify import describe

    node_config = hospital.node_config()
    default = RunConfig(resolution=resolution)
    config = SiteConfig.from_node_config(node_config, default)
    if not config.data_path.exists():
        raise FileNotFoundError(f"data-path: {config.data_path} does not exist")
    policy = config.policy
    unknown = sorted(set(policy.allowed_models or ()) - set(FAMILIES))
    if unknown:
        raise ValueError(f"site policy ({policy.where}): allowed-models names unknown families {unknown}; "
                         f"expected some of {sorted(FAMILIES)}")
    site = Site(config, resolution)
    train = site.train
    counts = np.bincount(train.labels, minlength=len(train.classes))
    units = site.units()
    eps_cap, delta = site.budget(default)
    if delta >= 1 / units:
        raise ValueError(f"site policy ({policy.where}): δ={delta:g} is not below 1/N = {1 / units:.3g} for "
                         f"{units} {site.unit}s; set max-delta below it")
    result = site.ledger.verify()
    if not result["ok"]:
        raise ValueError(f"ledger-path: {site.ledger.path} does not verify ({describe(result['problems'][0])}); "
                         f"the site refuses to train on it. Run `fedsynth audit {site.ledger.path}`")
    entries = site.ledger.entries()
    plans = [e for e in entries if e["kind"] == "plan"]
    ledger_delta = float(plans[-1]["delta"]) if plans else delta
    spent = site.ledger.epsilon(ledger_delta, default.accountant) if site.ledger.charges() else 0.0
    runs = sorted({e.get("run_id", "") for e in site.ledger.charges()})
    lines = [
        f"site {config.name}: dry run (nothing contacted, nothing written)",
        f"  data        {config.data_path}: {len(train)} training images "
        f"({', '.join(f'{n} {c}' for c, n in zip(train.classes, counts))}), "
        f"{train.channels}×{resolution}×{resolution} after resizing"
        + (f", {units} patients (unit of privacy: one patient)" if site.unit == "patient" else
           " (unit of privacy: one image)"),
        f"  holdout     {len(site.holdout)} images" if site.holdout is not None else
        "  holdout     none (the site's val split is absent)",
        f"  policy      {policy.rules() or 'none: the run config decides'} ({policy.where})",
        f"  ledger      {site.ledger.path}: {len(entries)} entries, verifies; "
        f"{len(site.ledger.charges())} rounds charged over {len(runs)} runs",
        f"  spent       ε = {spent:.3f} at δ = {ledger_delta:g} ({default.accountant.upper()})",
        f"  device      {resolve_device(config.device, 'node config')} (device {config.device})",
    ]
    if policy.max_epsilon is not None:
        left = policy.max_epsilon - spent
        lines.append(f"  budget left ε = {max(left, 0):.3f} of max-epsilon = {policy.max_epsilon:g}")
        if left <= 1e-9:
            raise ValueError(f"site policy ({policy.where}): max-epsilon={policy.max_epsilon:g} is spent "
                             f"(ε = {spent:.3f} in {site.ledger.path}); this site can't take part in another round")
    else:
        lines.append(f"  budget left no max-epsilon of its own: each run's ε (default {default.epsilon:g}) caps "
                     "its total; set max-epsilon to cap it here")
    lines.append("  would train every round the server asks for, as long as it fits the policy and the budget: "
                 f"model families {list(policy.allowed_models or sorted(FAMILIES))}"
                 + (f", at most {policy.max_rounds} rounds per run" if policy.max_rounds else ""))
    return "\n".join(lines)


def check_credentials(ca: Path, node_key: Path) -> None:
    """The CA certificate and the node key, readable as flower-supernode will read them."""
    cert = load_cert(ca, "--ca")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CertError(f"--ca: {ca} is not a CA certificate (pass ca.crt, not the server's certificate)")
    load_node_private(node_key, "--node-key")


def supernode_command(superlink: str, ca: Path, node_key: Path, config_file: Path,
                      host: str = "127.0.0.1", port: int = 9094, max_wait: float | None = None) -> list[str]:
    cmd = [flower_tool("flower-supernode"), "--superlink", superlink, "--root-certificates", str(Path(ca).resolve()),
           "--auth-supernode-private-key", str(Path(node_key).resolve()), "--node-config", str(config_file),
           "--host", host, "--port", str(port)]
    if max_wait is not None:
        cmd += ["--max-wait-time", f"{max_wait:g}"]
    return cmd


def write_node_config(hospital: Hospital, flwr_home: Path) -> Path:
    """The node config as a TOML file (flower-supernode reads a ``.toml`` path): paths with spaces survive."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    os.chmod(flwr_home, 0o700)
    path = flwr_home / "node-config.toml"
    atomic_write(path, tomli_w.dumps(hospital.node_config()).encode(), 0o600)
    return path


def start(hospital: Hospital, superlink: str, ca: Path, node_key: Path, flwr_home: Path | None = None,
          host: str = "127.0.0.1", port: int = 9094, max_wait: float | None = None, out: IO[str] | None = None):
    """Start flower-supernode for this hospital (own process group); returns the process."""
    out = out or sys.stdout
    flwr_home = Path(flwr_home or Path(hospital.node_config()["ledger-path"]).parent / ".flwr").resolve()
    config_file = write_node_config(hospital, flwr_home)
    cmd = supernode_command(superlink, ca, node_key, config_file, host, port, max_wait)
    print("starting: " + " ".join(cmd), file=out, flush=True)
    return start_group(cmd, None if out is sys.stdout else out, env=child_env(FLWR_HOME=str(flwr_home)))


def run_supernode(proc) -> int:
    """Wait for the SuperNode; Ctrl-C or SIGTERM stops it and everything it started."""
    exit_on_sigterm()
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_group(proc, grace=10)
