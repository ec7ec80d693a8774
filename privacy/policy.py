"""A hospital's own privacy policy: the rules its site enforces before any gradient is computed.

Rules (kebab-case keys, the same in a node config and in a JSON policy file):

| key | meaning | when the server asks for more |
|---|---|---|
| ``max-epsilon`` | total ε the site ever spends (over every round and run in its ledger) | capped |
| ``max-delta`` | largest δ the site accounts at | capped |
| ``max-rounds`` | most rounds the site takes part in per run | capped; later rounds refused |
| ``min-sigma`` | smallest noise multiplier σ the site trains with | refused |
| ``max-clip`` | largest clipping norm C | refused |
| ``allowed-models`` | generator families the site trains (list, or a comma-separated string) | refused |

The server's run config can ask for less than the policy allows, never for more: budgets are capped, and a
round whose mechanism breaks a rule is refused with the rule it broke.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

NUMBERS = {"max-epsilon": "a number > 0", "max-delta": "a number in (0, 1)", "min-sigma": "a number > 0",
           "max-clip": "a number > 0"}
KEYS = (*NUMBERS, "max-rounds", "allowed-models")


class PolicyError(ValueError):
    """A policy that can't be read; names the file (or node config) and the key."""


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float | None = None
    max_delta: float | None = None
    min_sigma: float | None = None
    max_clip: float | None = None
    max_rounds: int | None = None
    allowed_models: tuple[str, ...] | None = None
    sources: tuple[str, ...] = field(default=(), compare=False)  # where each rule came from, for messages

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str, ignore_unknown: bool = False) -> "SitePolicy":
        unknown = sorted(k for k in values if k not in KEYS)
        if unknown and not ignore_unknown:
            raise PolicyError(f"{source}: unknown policy key(s) {unknown}; expected some of {list(KEYS)}")
        kwargs: dict[str, Any] = {}
        for key, expected in NUMBERS.items():
            if key in values:
                value = values[key]
                try:
                    number = float(value) if not isinstance(value, bool) else math.nan
                except (TypeError, ValueError):
                    number = math.nan
                ok = number > 0 and math.isfinite(number) and (key != "max-delta" or number < 1)
                if not ok:
                    raise PolicyError(f"{source}: {key} must be {expected}, got {value!r}")
                kwargs[key.replace("-", "_")] = number
        if "max-rounds" in values:
            value = values["max-rounds"]
            try:
                rounds = int(value) if not isinstance(value, bool) and float(value).is_integer() else 0
            except (TypeError, ValueError):
                rounds = 0
            if rounds < 1:
                raise PolicyError(f"{source}: max-rounds must be an integer ≥ 1, got {value!r}")
            kwargs["max_rounds"] = rounds
        if "allowed-models" in values:
            value = values["allowed-models"]
            names = value.split(",") if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names) \
                    or not names:
                raise PolicyError(f"{source}: allowed-models must be a list of model families (or a "
                                  f"comma-separated string), got {value!r}")
            kwargs["allowed_models"] = tuple(n.strip() for n in names)
        return cls(**kwargs, sources=(source,) if kwargs else ())

    @classmethod
    def load(cls, path: Path) -> "SitePolicy":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise PolicyError(f"{path}: policy file does not exist") from None
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{path}:{exc.lineno}: not JSON ({exc.msg})") from None
        if not isinstance(values, dict):
            raise PolicyError(f"{path}: expected a JSON object with keys among {list(KEYS)}")
        return cls.from_mapping(values, str(path))

    def merged(self, other: "SitePolicy") -> "SitePolicy":
        """Both sets of rules; a rule set in both places is an error (say it once)."""
        mine, theirs = self.rules(), other.rules()
        both = sorted(set(mine) & set(theirs))
        if both:
            raise PolicyError(f"site policy: {both} set both in {', '.join(self.sources)} and in "
                              f"{', '.join(other.sources)}; set each rule in one place")
        values = {**mine, **theirs}
        return SitePolicy(**{k.replace("-", "_"): (tuple(v) if k == "allowed-models" else v) for k, v in values.items()},
                          sources=self.sources + other.sources)

    def rules(self) -> dict[str, Any]:
        """The rules that are set, kebab-case (what a plan entry records)."""
        out = {k.replace("_", "-"): v for k, v in asdict(self).items() if k != "sources" and v is not None}
        if "allowed-models" in out:
            out["allowed-models"] = list(out["allowed-models"])
        return out

    @property
    def where(self) -> str:
        return " and ".join(self.sources) or "no policy"

    # --- what the rules do ------------------------------------------------------------------------
    def budget(self, epsilon: float, delta: float) -> tuple[float, float]:
        eps = epsilon if self.max_epsilon is None else min(epsilon, self.max_epsilon)
        return eps, (delta if self.max_delta is None else min(delta, self.max_delta))

    def rounds(self, requested: int) -> int:
        return requested if self.max_rounds is None else min(requested, self.max_rounds)

    def run_violation(self, model: str, clip: float) -> str | None:
        """The rule a run's request breaks before anything is calibrated (None if none)."""
        if self.allowed_models is not None and model not in self.allowed_models:
            return (f"policy allowed-models={list(self.allowed_models)} ({self.where}): model family {model!r} "
                    "is not allowed")
        if self.max_clip is not None and clip > self.max_clip:
            return f"policy max-clip={self.max_clip:g} ({self.where}): the run asks for C={clip:g}"
        return None

    def plan_violation(self, sigma: float, clip: float, steps: int, epsilon: float) -> str | None:
        """The rule a calibrated (or recorded) plan breaks (None if none)."""
        if self.min_sigma is not None and sigma < self.min_sigma:
            return (f"policy min-sigma={self.min_sigma:g} ({self.where}): σ={sigma:.4g} calibrated for ε={epsilon:g} "
                    f"over {steps} steps is below it; ask for a smaller ε, fewer rounds or a lower sample rate")
        if self.max_clip is not None and clip > self.max_clip:
            return f"policy max-clip={self.max_clip:g} ({self.where}): the plan has C={clip:g}"
        return None

    def round_violation(self, server_round: int) -> str | None:
        if self.max_rounds is not None and server_round > self.max_rounds:
            return (f"policy max-rounds={self.max_rounds} ({self.where}): round {server_round} is past the "
                    f"{self.max_rounds} rounds per run the site takes part in")
        return None


def policy_from_node_config(node_config: Mapping[str, Any], default_file: Path | None = None) -> SitePolicy:
    """Rules from node-config keys, plus the JSON file named by ``policy-file`` (or ``default_file`` if it exists)."""
    policy = SitePolicy.from_mapping(node_config, "node config", ignore_unknown=True)
    file = node_config.get("policy-file")
    if file:
        policy = policy.merged(SitePolicy.load(Path(str(file))))
    elif default_file is not None and Path(default_file).exists():
        policy = policy.merged(SitePolicy.load(default_file))
    return policy
