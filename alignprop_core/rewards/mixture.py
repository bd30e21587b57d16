"""Weighted mixtures of rewards, e.g. the paper's "aesthetic + compressibility" runs in one line.

    R(x) = sum_k w_k * s_k(c_k(x))

where c_k is component k's reward, either maximised as is (c_k = r_k) or pulled toward a value
(c_k = -|v_k - r_k|, as in AlignProp's aesthetic runs with |10 - score|), and s_k is the identity
or, with `standardize=True`, (c - mean_k) / (std_k + eps) using running statistics updated from
detached batch statistics. The first batch initialises them; later batches blend in with `momentum`
(an exponentially weighted mean and variance that also counts the spread between batch means, so it
works with batches of one image). The statistics live in `MixtureReward.stats` and round-trip
through `state_dict()` / `load_state_dict()` with a training state.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .base import Reward, RewardFn, StatsPool, check_images, reward_modules
from .spec import RewardSpec, parse_args, split_outside

TARGET_KEY = "toward"  # reserved spec key: "aesthetic:1[toward=10]" means -|10 - r|
_COMPONENT_RE = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?::\s*([^\[\]]*?))?\s*(?:\[(.*)\])?\s*$")


@dataclass
class RunningStats:
    """Per-component running mean and variance of the (shaped) component rewards."""

    mean: list[float] = field(default_factory=list)  # one running mean per component
    var: list[float] = field(default_factory=list)  # one running variance per component
    batches: int = 0  # batches seen; 0 means the next batch initialises the statistics

    def update(self, batch_means: list[float], batch_vars: list[float], momentum: float) -> None:
        """Blend one batch's statistics in (the first batch replaces them)."""
        if self.batches == 0:
            self.mean, self.var = list(batch_means), list(batch_vars)
        else:
            for k, (m, v) in enumerate(zip(batch_means, batch_vars)):
                delta = m - self.mean[k]
                self.mean[k] += (1 - momentum) * delta
                # EW variance: old spread, shifted by how far the mean moved, plus the new spread.
                self.var[k] = momentum * (self.var[k] + (1 - momentum) * delta * delta) + (1 - momentum) * v
        self.batches += 1


class MixtureReward(Reward):
    """A `Reward` built by `make_mixture`; its state is the running statistics."""

    def __init__(self, fns: list[RewardFn], weights: list[float], targets: list[float | None],
                 standardize: bool, momentum: float, eps: float, spec: RewardSpec):
        super().__init__(spec)
        self.fns, self.weights, self.targets = fns, weights, targets
        self.standardize, self.momentum, self.eps = standardize, momentum, eps
        self.stats = RunningStats()
        self.update_stats = True  # set False to score (e.g. evaluation) without moving the statistics
        self.pool: StatsPool | None = None  # pools a batch's statistics over data-parallel ranks
        self.last_components: list[torch.Tensor] = []  # detached shaped components (B,), for logging
        # a part without gradient (e.g. toy_blobs) would be trained on in name only: judge it instead
        self.differentiable = all(getattr(fn, "differentiable", True) for fn in fns)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        parts = []
        for fn, target in zip(self.fns, self.targets):
            r = fn(images, prompts).float()  # (B,)
            parts.append(r if target is None else -(target - r).abs())
        self.last_components = [p.detach() for p in parts]
        if self.standardize:
            if self.update_stats:
                # population variance: a batch of one contributes 0 spread, not NaN
                means = [float(p.detach().mean()) for p in parts]
                spreads = [float(p.detach().var(unbiased=False)) for p in parts]
                if self.pool is not None:
                    means, spreads = self.pool(means, spreads)
                self.stats.update(means, spreads, self.momentum)
            elif self.stats.batches == 0:
                raise RuntimeError("standardized mixture called with update_stats=False before any "
                                   "statistics exist; score one training batch first or load a state.")
            # no spread seen yet (a first batch of one image): centre only, rather than divide by ~0
            parts = [(p - m) / ((math.sqrt(v) if v > 0 else 1.0) + self.eps)
                     for p, m, v in zip(parts, self.stats.mean, self.stats.var)]
        total = sum(w * p for w, p in zip(self.weights, parts))
        return total.to(images.device, torch.float32)

    def pool_batch_statistics(self, pool: StatsPool | None) -> None:
        self.pool = pool

    def moves_state_in_evaluation(self) -> bool:
        # scoring_only lets a standardised mixture without statistics take them from what it scores
        return self.standardize and self.stats.batches == 0

    def modules(self) -> list[torch.nn.Module]:
        """Every part's networks, each once (two parts may share one)."""
        found: dict[int, torch.nn.Module] = {}
        for fn in self.fns:
            for module in reward_modules(fn):
                found.setdefault(id(module), module)
        return list(found.values())

    def state_dict(self) -> dict[str, Any]:
        """Running statistics as plain numbers, for saving with a training state."""
        return {"mean": list(self.stats.mean), "var": list(self.stats.var), "batches": self.stats.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by `state_dict` (same number of components)."""
        if not state:
            self.stats = RunningStats()
            return
        n = len(self.fns)
        if state["batches"] and (len(state["mean"]) != n or len(state["var"]) != n):
            raise ValueError(f"saved mixture statistics have {len(state['mean'])} components but this "
                             f"mixture has {n}; resume with the same mixture spec.")
        self.stats = RunningStats([float(m) for m in state["mean"]], [float(v) for v in state["var"]],
                                  int(state["batches"]))

    @contextlib.contextmanager
    def scoring_only(self) -> Iterator[None]:
        """Score without moving the statistics. A mixture that has none yet may take them from the
        first batch it scores: it cannot standardise anything otherwise."""
        before = self.update_stats
        if self.stats.batches > 0:
            self.update_stats = False
        try:
            yield
        finally:
            self.update_stats = before


def make_mixture(components: Sequence[tuple], standardize: bool = False, momentum: float = 0.99,
                 eps: float = 1e-6, spec: RewardSpec | None = None) -> MixtureReward:
    """Weighted sum of rewards, optionally standardised per component with running statistics.

    Args:
        components: items `(fn, weight)` or `(fn, weight, shape)`; shape "max" (default) maximises
            the reward, `("target", v)` contributes -|v - r| instead.
        standardize: divide each shaped component by its running std after subtracting its mean.
        momentum: weight of the old statistics per batch, in [0, 1).
        eps: added to the running std before dividing.
        spec: what the mixture is, as data (default: a 'mixture' spec without arguments; the
            registry and the ComfyUI mixer give the full one).

    Returns:
        A `MixtureReward`; its `.stats` / `state_dict()` hold the running statistics.

    Raises:
        ValueError: no components, a non-callable, a non-finite weight or an unknown shape.
    """
    if not components:
        raise ValueError("make_mixture needs at least one (reward_fn, weight) component.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}.")
    if not eps > 0:
        raise ValueError(f"eps must be > 0; got {eps}.")
    fns, weights, targets = [], [], []
    for i, item in enumerate(components):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"mixture component {i} must be (fn, weight) or (fn, weight, shape); "
                             f"got {item!r}.")
        fn, weight, shape = item[0], item[1], item[2] if len(item) == 3 else "max"
        if not callable(fn):
            raise ValueError(f"mixture component {i}: {fn!r} is not a reward function.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"mixture component {i}: weight must be a finite number; got {weight!r}.")
        fns.append(fn)
        weights.append(float(weight))
        targets.append(_shape_target(shape, i))
    return MixtureReward(fns, weights, targets, standardize, momentum, eps,
                         spec if spec is not None else RewardSpec("mixture"))


def _shape_target(shape, index: int) -> float | None:
    if shape == "max":
        return None
    elif (isinstance(shape, (tuple, list)) and len(shape) == 2 and shape[0] == "target"
          and isinstance(shape[1], (int, float)) and not isinstance(shape[1], bool)
          and math.isfinite(shape[1])):
        return float(shape[1])
    else:
        raise ValueError(f"mixture component {index}: shape must be 'max' or ('target', value); "
                         f"got {shape!r}.")


def parse_mixture(spec: str, factories: dict[str, Callable]) -> list[tuple[str, float, dict[str, Any]]]:
    """Parse "name[:weight][key=value; ...], ..." into (name, weight, kwargs) triples.

    Example: "aesthetic:1.0[toward=10], jpeg_compressibility:0.5, object_count:2[object_name=cat; target=3]".
    The weight defaults to 1. Keys are factory keyword arguments, except the reserved `toward=v`,
    which `mixture_from_spec` turns into the shape ("target", v) instead of passing it on.

    Args:
        spec: the one-line mixture description.
        factories: reward name -> factory (e.g. the registry `REWARDS`).

    Returns:
        One (name, weight, kwargs) per component, in order.

    Raises:
        ValueError: empty spec, malformed component, unknown name (lists the valid ones), bad weight
            or a key the factory does not accept.
    """
    if not spec or not spec.strip():
        raise ValueError("mixture spec is empty; write e.g. 'aesthetic:1.0, jpeg_compressibility:0.5'.")
    valid = ", ".join(sorted(factories))
    out = []
    for text in split_outside(spec, ","):
        match = _COMPONENT_RE.match(text)
        if not match:
            raise ValueError(f"cannot parse mixture component {text.strip()!r}; write "
                             "'name:weight' or 'name:weight[key=value; ...]'.")
        name, weight_text, kw_text = match.groups()
        if name not in factories:
            raise ValueError(f"unknown reward {name!r} in mixture spec; valid rewards: {valid}.")
        try:
            weight = 1.0 if weight_text is None else float(weight_text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"weight {weight_text!r} of mixture component {name!r} is not a finite "
                             "number; write e.g. 'name:0.5'.")
        out.append((name, weight, _parse_kwargs(kw_text, name, factories[name])))
    return out


def _parse_kwargs(text: str | None, name: str, factory: Callable) -> dict[str, Any]:
    kwargs = parse_args(text, f"mixture component {name!r}")
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k != TARGET_KEY and k not in params]
    if unknown and not takes_any:
        raise ValueError(f"mixture component {name!r}: unknown option(s) {', '.join(unknown)}; "
                         f"accepted: {', '.join([*params, TARGET_KEY])}.")
    return kwargs


def mixture_from_spec(spec: str, factories: dict[str, Callable], standardize: bool = False,
                      momentum: float = 0.99, eps: float = 1e-6) -> MixtureReward:
    """Parse `spec`, build each component with its factory and mix them (see `parse_mixture`)."""
    components = []
    for name, weight, kwargs in parse_mixture(spec, factories):
        kwargs = dict(kwargs)
        toward = kwargs.pop(TARGET_KEY, None)
        if toward is not None and (isinstance(toward, bool) or not isinstance(toward, (int, float))):
            raise ValueError(f"mixture component {name!r}: {TARGET_KEY}={toward!r} must be a number.")
        shape = "max" if toward is None else ("target", float(toward))
        components.append((factories[name](**kwargs), weight, shape))
    return make_mixture(components, standardize=standardize, momentum=momentum, eps=eps,
                        spec=RewardSpec("mixture", {"spec": spec, "standardize": standardize,
                                                    "momentum": momentum}))


def mixture_spec(components: Sequence[tuple[RewardSpec, float]], standardize: bool = False,
                 momentum: float = 0.99) -> RewardSpec:
    """The spec of a mixture of rewards given by their specs and weights, in the one-line component
    form `mixture_from_spec` reads (``name:weight[key=value; ...]``)."""
    parts = []
    for spec, weight in components:
        options = spec.text()[len(spec.name):]  # "" or "[key=value; ...]"
        parts.append(f"{spec.name}:{float(weight)!r}{options}")
    return RewardSpec("mixture", {"spec": ", ".join(parts), "standardize": standardize, "momentum": momentum})
