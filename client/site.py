"""A site (hospital): its data, its ledger and its own privacy policy — the site decides, not the server.

The site's rules (``privacy.policy.SitePolicy``) come from its node config and/or a policy file; the server's
run config may ask for less, never for more. σ is calibrated once per run for every step the site agrees to
(all planned rounds), composed on top of everything its ledger already holds. Before any gradient of a round
the site checks, in order: its ledger verifies (chain, signatures, head), the run's model family and C are
allowed, the round is within the rounds it agreed to, σ meets its minimum, and the round fits its budget.
A round that breaks a rule is refused with the rule; the refusal is logged in the ledger and nothing is charged.

Round 0 (when the run's class-mean-share > 0) is the site's one class-mean release (privacy/class_means.py):
its σ is calibrated in the same plan, for share × ε on its own, and the DP-SGD σ for the whole budget on top of
it; it is charged like a round, as one step at q = 1.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsynth.config import RunConfig, resolve_device
from privacy.accountant import BudgetExhausted, calibrate_sigma, epsilon, steps_per_round
from privacy.class_means import default_clip, noise_multiplier
from privacy.ledger import MECHANISM, RELEASED, Ledger, LedgerError
from privacy.policy import SitePolicy, policy_from_node_config
from privacy.verify import describe

from .data import ImageDataset, load_dataset
from .outbox import load_update, outbox_path

log = logging.getLogger("fedsynth.client")
POLICY_FILE = "policy.json"  # simulation: STATE_DIR/site-K/policy.json, if the hospital (or researcher) wrote one


class RoundRefused(RuntimeError):
    """The site declines a round; the message says which rule it broke. Nothing leaves the site."""

    def __init__(self, message: str, rule: str = ""):
        super().__init__(message)
        self.rule = rule


@dataclass(frozen=True)
class SiteConfig:
    name: str
    data_path: Path
    ledger_path: Path
    policy: SitePolicy = field(default_factory=SitePolicy)
    key_path: Path | None = None  # the ledger's signing key; default site.key beside the ledger
    canaries: Path | None = None  # simulation with --audit-canaries: this run's canary file (simulations/canaries.py)
    slice_axis: str = "axial"  # node config slice-axis: how NIfTI volumes are sliced (client/nifti.py)
    device: str = "auto"  # node config device (auto | cpu | cuda[:N]): this hospital's hardware; default the run's

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], run: RunConfig) -> "SiteConfig":
        """Deployment: keys ``site-name``, ``data-path`` (``client/data.py`` load_dataset: .npz, manifest .csv or
        folder), ``slice-axis`` (NIfTI only), ``ledger-path``, ``ledger-key``, the policy keys of
        ``privacy.policy`` (``max-epsilon``, ``max-delta``, ``min-sigma``, ``max-clip``, ``max-rounds``,
        ``allowed-models``) and/or ``policy-file`` (JSON with the same keys), ``device`` (default: the run's).

        Simulation: Flower gives only ``partition-id``; the simulated hospital ``site-K`` lives in
        ``STATE_DIR/site-K/`` (its data file written by the runner, its ledger, keys and optional
        ``policy.json`` beside it).
        """
        if "data-path" in node_config:
            data = Path(str(node_config["data-path"]))
            name = str(node_config.get("site-name", data.stem))
            ledger = Path(str(node_config.get("ledger-path", data.parent / "ledger.jsonl")))
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
        policy = policy_from_node_config(node_config, ledger.parent / POLICY_FILE)
        key = Path(str(node_config["ledger-key"])) if "ledger-key" in node_config else None
        canaries = None
        if run.audit_canaries and "data-path" not in node_config:  # simulation only: a hospital plants none
            from simulations.canaries import CANARY_SITE, canary_file
            if name == CANARY_SITE:
                canaries = canary_file(run.state_dir, run.run_id)
                if not canaries.is_file():
                    raise ValueError(f"{canaries}: missing; audit-canaries={run.audit_canaries} needs the canaries "
                                     "that `fedsynth simulate --audit-canaries` plants before the run")
        device = str(node_config.get("device", run.device))
        resolve_device(device, "node config")  # a GPU this node does not have: refused before anything is read
        return cls(name, data, ledger, policy, key, canaries, str(node_config.get("slice-axis", "axial")), device)


class Site:
    def __init__(self, config: SiteConfig, resolution: int = 28, num_classes: int | None = None):
        self.config = config
        self.policy = config.policy
        self.ledger = Ledger(config.ledger_path, config.key_path)
        self.train = load_dataset(config.data_path, "train", resolution, num_classes, config.slice_axis)
        if config.canaries is not None:  # the included canaries are trained on (and charged) like any image
            from simulations.canaries import with_canaries
            self.train = with_canaries(self.train, config.canaries)
        try:
            self.holdout: ImageDataset | None = load_dataset(config.data_path, "val", resolution, num_classes,
                                                             config.slice_axis)
        except ValueError:
            self.holdout = None  # a hospital folder without a holdout split: evaluation is skipped

    @property
    def unit(self) -> str:
        """``patient`` when the site's images carry patient ids (sampling and clipping per patient), else ``image``."""
        return "image" if self.train.patient_ids is None else "patient"

    def units(self) -> int:
        return len(self.train) if self.train.patient_ids is None else len(np.unique(self.train.patient_ids))

    def budget(self, run: RunConfig) -> tuple[float, float]:
        """(ε, δ) this site will spend in total: the run's request, capped by the site's own policy."""
        return self.policy.budget(run.epsilon, run.delta)

    def _refused(self, reason: str, rule: str) -> RoundRefused:
        return RoundRefused(f"{self.config.name}: {reason}", rule)

    def verify_ledger(self) -> None:
        """Refuse to train on a ledger that doesn't verify: its ε could be under-counted."""
        result = self.ledger.verify()
        if not result["ok"]:
            first = describe(result["problems"][0])
            more = len(result["problems"]) - 1
            raise self._refused(f"ledger: {self.ledger.path} does not verify ({first}"
                                f"{f'; and {more} more' if more else ''}); run `fedsynth audit {self.ledger.path}`",
                                "ledger")

    def plan(self, run: RunConfig) -> dict[str, Any]:
        """The run's plan (σ for every step the site agrees to); calibrated and recorded on first use."""
        existing = self.ledger.plan(run.run_id)
        if existing is not None:
            return existing
        eps, delta = self.budget(run)
        if delta >= 1 / self.units():
            raise self._refused(f"δ={delta:g} is not below 1/N={1 / self.units():.2g} (unit: {self.unit})", "delta")
        steps, rounds = steps_per_round(run.local_epochs, run.sample_rate), self.policy.rounds(run.rounds)
        prior, release = self.ledger.history_before(run.run_id), None
        if run.class_mean_share > 0:  # round 0: one Gaussian release of the class means, share × ε on its own
            dim = run.channels * (run.resolution // run.coarse) ** 2
            release = {"sigma": noise_multiplier(run.class_mean_share * eps, delta, run.accountant),
                       "clip": default_clip(dim), "coarse": run.coarse, "share": run.class_mean_share}
            prior = prior + [(release["sigma"], 1.0, 1)]
        try:
            sigma = calibrate_sigma(eps, delta, run.sample_rate, steps * rounds, prior=prior,
                                    accountant=run.accountant)
        except BudgetExhausted as exc:
            raise self._refused(f"budget: {exc}", "budget") from None
        for s in [sigma] + ([release["sigma"]] if release else []):
            broken = self.policy.plan_violation(s, run.clip, steps * rounds, eps)
            if broken:
                raise self._refused(broken, _rule(broken))
        return self.ledger.append({
            "kind": "plan", "run_id": run.run_id, "model": run.model, "mechanism": MECHANISM, "sigma": sigma,
            "clip": run.clip, "sample_rate": run.sample_rate, "steps_per_round": steps, "rounds": rounds,
            "rounds_requested": run.rounds, "epsilon_budget": eps, "delta": delta, "accountant": run.accountant,
            "unit": self.unit, "site": self.config.name, "policy": self.policy.rules(), "class_means": release})

    @staticmethod
    def round_step(plan: dict[str, Any], server_round: int) -> tuple[float, float, int]:
        """(σ, q, steps) the plan charges for ``server_round``: round 0 is the class-mean release."""
        if server_round == 0:
            return float(plan["class_means"]["sigma"]), 1.0, 1
        return float(plan["sigma"]), float(plan["sample_rate"]), int(plan["steps_per_round"])

    def check_round(self, run: RunConfig, server_round: int) -> dict[str, Any]:
        """Return the plan if the site can take part in this round, else raise RoundRefused with the rule."""
        self.verify_ledger()
        for broken in (self.policy.run_violation(run.model, run.clip), self.policy.round_violation(server_round)):
            if broken:
                raise self._refused(broken, _rule(broken))
        plan = self.plan(run)
        # The policy may have been tightened since the plan was recorded: check the plan against it again.
        broken = self.policy.plan_violation(plan["sigma"], plan["clip"], plan["steps_per_round"] * plan["rounds"],
                                            plan["epsilon_budget"])
        if broken:
            raise self._refused(broken, _rule(broken))
        if plan.get("unit", "image") != self.unit:
            raise self._refused(f"the run was planned with one {plan.get('unit')} as the unit, but the site's data "
                                f"now has one {self.unit} as the unit; start a new run", "unit")
        if server_round > plan["rounds"]:
            raise self._refused(f"round {server_round} is past the {plan['rounds']} rounds agreed", "rounds")
        if server_round == 0 and not plan.get("class_means"):
            raise self._refused("round 0 (the class-mean release) is not in the plan this site agreed to for "
                                f"{run.run_id} (class-mean-share 0)", "rounds")
        if self.ledger.rounds().count((run.run_id, server_round)):
            if self.replayable(run, server_round):
                return plan  # a restarted server asks again: re-send the update already paid for (client/outbox.py)
            raise self._refused(f"round {server_round} of {run.run_id} was already charged", "already-charged")
        budget = self.policy.budget(plan["epsilon_budget"], plan["delta"])[0]
        after = epsilon(self.ledger.history() + [self.round_step(plan, server_round)], plan["delta"],
                        plan["accountant"])
        if after > budget + 1e-9:
            raise self._refused(f"budget: round {server_round} would bring ε to {after:.3f}, above the budget "
                                f"ε={budget:g}", "budget")
        return plan

    def charge_for(self, run: RunConfig, server_round: int) -> dict[str, Any] | None:
        found = [e for e in self.ledger.charges() if e.get("run_id") == run.run_id and e.get("round") == server_round]
        return found[-1] if found else None

    def replayable(self, run: RunConfig, server_round: int) -> bool:
        """Whether this round's charged update is in the outbox, so it can be re-sent without a new charge."""
        charge = self.charge_for(run, server_round)
        if charge is None or charge.get("released") not in ("weights", "class-means"):
            return False
        kept = load_update(outbox_path(self.config.ledger_path, run.run_id, server_round))
        return kept is not None and kept[1].get("weights_sha256") == charge.get("weights_sha256")

    def refuse(self, run: RunConfig, server_round: int, reason: str, rule: str = "") -> None:
        try:
            self.ledger.append({"kind": "refusal", "run_id": run.run_id, "round": server_round, "reason": reason,
                                "rule": rule, "site": self.config.name})
        except LedgerError as exc:  # a ledger the site can't extend (e.g. signed by another key): still refuse
            log.error("%s: could not log the refusal of round %d: %s", self.config.name, server_round, exc)

    def charge(self, run: RunConfig, server_round: int, plan: dict[str, Any],
               history: list[tuple[float, float, int]], weights_sha256: str | None = None,
               released: str = "weights", failure: str | None = None) -> dict[str, Any]:
        """Record the steps whose result is about to leave the site (exactly what the accountant saw).

        ``released``: what leaves after the charge — ``weights`` (with their sha256), ``class-means`` (round 0's
        release, with the sha256 of its vector) or ``failure-notice`` (the round failed; the mere failure depends
        on the data, so it is charged all the same).
        """
        if released not in RELEASED:
            raise ValueError(f"charge: released must be one of {RELEASED}, got {released!r}")
        (sigma, q, steps), = history
        want_sigma, want_q, _ = self.round_step(plan, server_round)
        if not (math.isclose(sigma, want_sigma) and math.isclose(q, want_q)):
            raise RuntimeError(f"{self.config.name}: round {server_round} ran with σ={sigma}, q={q}, not the plan's "
                               f"σ={want_sigma}, q={want_q}")
        eps_after = epsilon(self.ledger.history() + [(sigma, q, steps)], plan["delta"], plan["accountant"])
        entry = {
            "kind": "charge", "run_id": run.run_id, "round": server_round, "mechanism": MECHANISM, "sigma": sigma,
            "clip": plan["class_means"]["clip"] if server_round == 0 else plan["clip"], "sample_rate": q,
            "steps": steps, "delta": plan["delta"],
            "accountant": plan["accountant"], "unit": plan["unit"], "epsilon_after": eps_after,
            "released": released, "weights_sha256": None if released == "failure-notice" else weights_sha256,
            "site": self.config.name}
        if failure:
            entry["failure"] = failure
        return self.ledger.append(entry)

    def status(self, run: RunConfig) -> dict[str, Any]:
        """Public facts about this site's spend (what the server may report)."""
        everything = self.ledger.charges()
        charges = [c for c in everything if c.get("round") != 0]  # training rounds (round 0: class-mean release)
        plan = self.ledger.plan(run.run_id) or {}
        eps_budget, delta = self.budget(run)
        return {
            "site": self.config.name, "epsilon": self.ledger.epsilon(delta, run.accountant), "delta": delta,
            "epsilon-budget": eps_budget, "unit": plan.get("unit", "image"), "accountant": run.accountant,
            "sigma": float(plan["sigma"]) if plan else "", "clip": float(plan.get("clip", run.clip)),
            "sample-rate": float(plan.get("sample_rate", run.sample_rate)),
            "steps": int(sum(c["steps"] for c in charges)), "rounds": len(charges),
            "rounds-this-run": sum(1 for c in charges if c.get("run_id") == run.run_id),
            # which rounds of this run were charged: the server compares them with the rounds it used
            "charged-rounds": ",".join(str(c["round"]) for c in charges if c.get("run_id") == run.run_id),
            "class-mean-releases": len(everything) - len(charges)}


def _rule(message: str) -> str:
    """``policy min-sigma=…`` -> ``policy:min-sigma`` (what a refusal entry records as its rule)."""
    return "policy:" + message.split()[1].split("=")[0] if message.startswith("policy ") else ""
