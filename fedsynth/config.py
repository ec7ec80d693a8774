"""The one run configuration: built from the CLI (or Flower's run_config), sent to every site each round.

Flower carries it as a flat dict of scalars with kebab-case keys (``to_flower`` / ``from_flower``); nothing
deeper in the code re-parses strings.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path(__file__).resolve().parent.parent / "simulations" / "data" / "pneumoniamnist.npz"


def _device_name_ok(name: str) -> bool:
    head, _, index = str(name).partition(":")
    return (name in ("auto", "cpu", "cuda")) or (head == "cuda" and index.isdigit())


def resolve_device(name: str, source: str = "run config") -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; an explicit GPU that is not there is an error
    (a site silently training on the CPU would be 10-100× slower than its operator planned for)."""
    import torch
    if not _device_name_ok(name):
        raise ValueError(f"{source}: device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        index = int(name.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise ValueError(f"{source}: device is {name!r}, but torch {torch.__version__} sees "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s); "
                             "use device auto or cpu")
    return name


@dataclass(frozen=True)
class RunConfig:
    run_id: str = "run"
    model: str = "vae"
    rounds: int = 20
    sites: int = 3
    # Privacy: the site's budget for everything it ever releases, and the mechanism's knobs.
    epsilon: float = 10.0
    delta: float = 1e-5
    clip: float = 1.0
    sample_rate: float = 0.3
    local_epochs: float = 12.0
    accountant: str = "prv"
    # Share of ε each site spends once, before round 1, on its per-class mean images (privacy/class_means.py):
    # the release alone would cost class_mean_share × epsilon; the DP-SGD steps are calibrated for the whole
    # budget on top of it (PRV composition). Gaussian mechanisms compose roughly in quadrature, so 0.3 costs the
    # DP-SGD steps only ≈ 6-7% more noise (σ 4.32 → 4.62 at the demo's ε = 10; 32 → 34 at ε = 1). 0 = no
    # release: every family starts from its plain initialization.
    class_mean_share: float = 0.3
    # Model and optimizer.
    lr: float = 2e-2
    lr_final: float = 5e-4
    latent_dim: int = 4
    width: int = 0
    coarse: int = 2
    num_classes: int = 2
    channels: int = 1
    resolution: int = 28
    n_critic: int = 1  # gan: discriminator (DP) steps per generator step; a site's planned steps are D steps
    # gan: weight of the mode-seeking term in the generator step (models/gan.py). It sees no real image, so it
    # costs no ε; without it the private GAN collapses onto a few images per class (BENCHMARKS.md). 0 = off.
    diversity: float = 1.0
    noise_multiplicity: int = 4  # diffusion: noise draws per image per DP step (together one privacy unit)
    sampler_steps: int = 10  # diffusion: DDIM steps per sample
    # Where each site trains: auto (a GPU when torch sees one, else the CPU) | cpu | cuda | cuda:N. A hospital's
    # own node config key ``device`` overrides it; the DP mechanism and its accounting are the same on any.
    device: str = "auto"
    # Federation.
    secure: bool = True
    partition: str = "dirichlet:1.0"
    holdout_fraction: float = 0.2
    seed: int = 0
    fraction: float = 1.0  # share of the willing sites sampled per round (deterministic from seed and round)
    # SecAgg+ wire format: False = mask the weights (±8, 2**22 levels, uint32 on the wire); True = mask the
    # update minus the global model (±2, 16-bit modulus: uint16 on the wire, half the bytes; see BENCHMARKS.md).
    secagg_deltas: bool = False
    # Robustness. dropout / straggler: simulated faults, per site and round with this probability (see
    # client/faults.py); round-timeout: seconds the server waits for a round's updates (stragglers past it are
    # left out); max-update-norm: L2 bound on a site's update (its weights minus the global model).
    dropout: float = 0.0
    straggler: float = 0.0
    round_timeout: float = 600.0
    max_update_norm: float = 1000.0
    data_path: str = ""
    state_dir: str = "state"
    out_dir: str = "runs"
    # Simulation only: plant this many canaries at site-0 (each trained on with probability ½) and bound ε
    # from below after training (privacy/canary_audit.py); 0 = off.
    audit_canaries: int = 0

    def __post_init__(self):
        checks = [
            (self.rounds >= 1, "rounds", "an integer ≥ 1"),
            (self.sites >= 1, "sites", "an integer ≥ 1"),
            (self.epsilon > 0, "epsilon", "a number > 0"),
            (0 < self.delta < 1, "delta", "a number in (0, 1)"),
            (self.clip > 0, "clip", "a number > 0"),
            (0 < self.sample_rate <= 1, "sample-rate", "a number in (0, 1]"),
            (self.local_epochs > 0, "local-epochs", "a number > 0"),
            (self.accountant in ("prv", "rdp"), "accountant", "prv or rdp"),
            (0 <= self.class_mean_share < 1, "class-mean-share", "a share of the budget in [0, 1) (0 = off)"),
            (self.lr > 0, "lr", "a number > 0"),
            (0 < self.lr_final <= self.lr, "lr-final", "a number in (0, lr]"),
            (0 <= self.holdout_fraction < 1, "holdout-fraction", "a number in [0, 1)"),
            (self.resolution % 4 == 0, "resolution", "a multiple of 4"),
            (self.n_critic >= 1, "n-critic", "an integer ≥ 1"),
            (self.diversity >= 0, "diversity", "a number ≥ 0 (0 = no mode-seeking term)"),
            (self.noise_multiplicity >= 1, "noise-multiplicity", "an integer ≥ 1"),
            (self.sampler_steps >= 1, "sampler-steps", "an integer ≥ 1"),
            (_device_name_ok(self.device), "device", "auto, cpu, cuda or cuda:N"),
            (0 < self.fraction <= 1, "fraction", "a number in (0, 1]"),
            (0 <= self.dropout < 1, "dropout", "a probability in [0, 1)"),
            (0 <= self.straggler < 1, "straggler", "a probability in [0, 1)"),
            (self.round_timeout > 0, "round-timeout", "a number of seconds > 0"),
            (self.max_update_norm > 0, "max-update-norm", "a number > 0"),
            (self.audit_canaries >= 0, "audit-canaries", "an integer ≥ 0 (0 = no canary audit)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"run config: {name} must be {expected}, got {getattr(self, name.replace('-', '_'))!r}")

    @property
    def data_file(self) -> Path:
        return Path(self.data_path) if self.data_path else DEFAULT_DATA

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.run_id

    def model_kwargs(self) -> dict[str, Any]:
        """Every family's knobs; ``models.build_generator`` passes each family the ones it takes."""
        return dict(num_classes=self.num_classes, channels=self.channels, resolution=self.resolution,
                    latent_dim=self.latent_dim, width=self.width, coarse=self.coarse, n_critic=self.n_critic,
                    diversity=self.diversity, noise_multiplicity=self.noise_multiplicity, sampler_steps=self.sampler_steps)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_flower(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_flower(cls, values: dict[str, Any], source: str = "run config") -> "RunConfig":
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                continue  # Flower adds its own keys (e.g. the server round) beside ours
            want = known[name].type
            try:
                if want == "int" and isinstance(value, float) and not value.is_integer():
                    raise ValueError  # 2.7 rounds is a typo, not 2
                kwargs[name] = {"int": int, "float": float, "str": str}.get(want, lambda v: v)(value)
                if want == "bool":
                    kwargs[name] = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            except (TypeError, ValueError):
                raise ValueError(f"{source}: {key} must be {want}, got {value!r}") from None
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)
