"""A site (hospital): its data, its ledger and its own privacy policy — the site decides, not the server.

The site's budget comes from its node config; the server's run config may ask for less, never for more.
σ is calibrated once per run for every step the site agrees to (all planned rounds), composed on top of
everything its ledger already holds, and each round is checked against the budget before any gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.config import RunConfig
from privacy.accountant import BudgetExhausted, calibrate_sigma, epsilon, steps_per_round
from privacy.ledger import Ledger

from .data import ImageDataset, load_dataset


class RoundRefused(RuntimeError):
    """The site declines a round; the message says which rule it broke. Nothing leaves the site."""


@dataclass(frozen=True)
class SiteConfig:
    name: str
    data_path: Path
    ledger_path: Path
    max_epsilon: float | None = None  # the site's own budget; None = accept the run's epsilon
    max_delta: float | None = None

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], run: RunConfig) -> "SiteConfig":
        """Deployment: keys ``site-name``, ``data-path``, ``ledger-path``, ``max-epsilon``, ``max-delta``.

        Simulation: Flower gives only ``partition-id``; the simulated hospital ``site-K`` lives in
        ``STATE_DIR/site-K/`` (its data file written by the runner, its ledger beside it).
        """
        if "data-path" in node_config:
            name = str(node_config.get("site-name", Path(str(node_config["data-path"])).stem))
            ledger = Path(str(node_config.get("ledger-path", Path(str(node_config["data-path"])).parent / "ledger.jsonl")))
            data = Path(str(node_config["data-path"]))
        elif "partition-id" in node_config:
            name = f"site-{int(node_config['partition-id'])}"
            folder = Path(run.state_dir) / name
            data, ledger = folder / "data.npz", folder / "ledger.jsonl"
            if not data.exists():  # `flwr run .` skips fedsynth's runner: split the data the same way here
                from simulations.runner import prepare_sites
                prepare_sites(run.replace(sites=int(node_config.get("num-partitions", run.sites))))
        else:
            raise ValueError("node config: expected data-path (deployment) or partition-id (simulation), "
                             f"got keys {sorted(node_config)}")
        opt = lambda k: float(node_config[k]) if k in node_config else None  # noqa: E731
        return cls(name, data, ledger, opt("max-epsilon"), opt("max-delta"))


class Site:
    def __init__(self, config: SiteConfig, resolution: int = 28, num_classes: int | None = None):
        self.config = config
        self.ledger = Ledger(config.ledger_path)
        self.train = load_dataset(config.data_path, "train", resolution, num_classes)
        try:
            self.holdout: ImageDataset | None = load_dataset(config.data_path, "val", resolution, num_classes)
        except ValueError:
            self.holdout = None  # a hospital folder without a holdout split: evaluation is skipped

    def budget(self, run: RunConfig) -> tuple[float, float]:
        """(ε, δ) this site will spend in total: the run's request, capped by the site's own policy."""
        eps = run.epsilon if self.config.max_epsilon is None else min(run.epsilon, self.config.max_epsilon)
        delta = run.delta if self.config.max_delta is None else min(run.delta, self.config.max_delta)
        return eps, delta

    def plan(self, run: RunConfig) -> dict[str, Any]:
        """The run's plan (σ for every step the site agrees to); calibrated and recorded on first use."""
        existing = self.ledger.plan(run.run_id)
        if existing is not None:
            return existing
        eps, delta = self.budget(run)
        if delta >= 1 / len(self.train):
            raise RoundRefused(f"{self.config.name}: δ={delta:g} is not below 1/N={1 / len(self.train):.2g}")
        steps = steps_per_round(run.local_epochs, run.sample_rate)
        try:
            sigma = calibrate_sigma(eps, delta, run.sample_rate, steps * run.rounds,
                                    prior=self.ledger.history_before(run.run_id), accountant=run.accountant)
        except BudgetExhausted as exc:
            raise RoundRefused(f"{self.config.name}: budget: {exc}") from None
        return self.ledger.append({
            "kind": "plan", "run_id": run.run_id, "sigma": sigma, "clip": run.clip, "sample_rate": run.sample_rate,
            "steps_per_round": steps, "rounds": run.rounds, "epsilon_budget": eps, "delta": delta,
            "accountant": run.accountant, "unit": "image", "site": self.config.name})

    def check_round(self, run: RunConfig, server_round: int) -> dict[str, Any]:
        """Return the plan if the site can pay for this round, else raise RoundRefused with the reason."""
        plan = self.plan(run)
        if server_round > plan["rounds"]:
            raise RoundRefused(f"{self.config.name}: round {server_round} is past the {plan['rounds']} rounds agreed")
        if self.ledger.rounds().count((run.run_id, server_round)):
            raise RoundRefused(f"{self.config.name}: round {server_round} of {run.run_id} was already charged")
        after = epsilon(self.ledger.history() + [(plan["sigma"], plan["sample_rate"], plan["steps_per_round"])],
                        plan["delta"], plan["accountant"])
        if after > plan["epsilon_budget"] + 1e-9:
            raise RoundRefused(f"{self.config.name}: budget: round {server_round} would bring ε to {after:.3f}, "
                               f"above the budget ε={plan['epsilon_budget']:g}")
        return plan

    def refuse(self, run: RunConfig, server_round: int, reason: str) -> None:
        self.ledger.append({"kind": "refusal", "run_id": run.run_id, "round": server_round, "reason": reason,
                            "site": self.config.name})

    def charge(self, run: RunConfig, server_round: int, plan: dict[str, Any],
               history: list[tuple[float, float, int]]) -> dict[str, Any]:
        """Record the steps whose result is about to leave the site (exactly what the accountant saw)."""
        (sigma, q, steps), = history
        if not (math.isclose(sigma, plan["sigma"]) and math.isclose(q, plan["sample_rate"])):
            raise RuntimeError(f"{self.config.name}: trained with σ={sigma}, q={q}, not the plan's {plan}")
        eps_after = epsilon(self.ledger.history() + [(sigma, q, steps)], plan["delta"], plan["accountant"])
        return self.ledger.append({
            "kind": "charge", "run_id": run.run_id, "round": server_round, "sigma": sigma, "clip": plan["clip"],
            "sample_rate": q, "steps": steps, "delta": plan["delta"], "accountant": plan["accountant"],
            "unit": plan["unit"], "epsilon_after": eps_after, "site": self.config.name})

    def status(self, run: RunConfig) -> dict[str, Any]:
        """Public facts about this site's spend (what the server may report)."""
        charges = self.ledger.charges()
        plan = self.ledger.plan(run.run_id) or {}
        eps_budget, delta = self.budget(run)
        return {
            "site": self.config.name, "epsilon": self.ledger.epsilon(delta, run.accountant), "delta": delta,
            "epsilon-budget": eps_budget, "unit": plan.get("unit", "image"), "accountant": run.accountant,
            "sigma": float(plan["sigma"]) if plan else "", "clip": float(plan.get("clip", run.clip)),
            "sample-rate": float(plan.get("sample_rate", run.sample_rate)),
            "steps": int(sum(c["steps"] for c in charges)), "rounds": len(charges),
            "rounds-this-run": sum(1 for c in charges if c.get("run_id") == run.run_id)}
