"""Schedules of the distillation weight α and temperature T over training, fixed or driven by progress.

Why schedule them: early in training the teacher's soft labels carry far more information per token than a
one-hot label (α high, T high smooths them further); once the student has absorbed the teacher's shape, the
hard labels are what the final model is judged on (α lower, T back toward 1). Two ways to move:

- by training progress p = step / total_steps ∈ [0, 1] (`Schedule`): constant, linear or half-cosine from
  `start` to `end`, optionally holding `start` for the first `hold` fraction of training;
- by learning progress (`AdaptiveAlpha`): how far the student still is from the teacher, measured by the soft
  KD divergence d_n the trainer observes each step. With m_n its EMA (m_1 = d_1, m_n = γ·m_{n-1} + (1 − γ)·d_n)
  and ref the mean of the first R observations, the ratio r = m_n / ref starts near 1 and falls as the student
  catches up, and
      α(r) = end + (start − end) · clip((r − floor) / (1 − floor), 0, 1)
  is start while r ≥ 1 (and during the first R observations), reaches end at r = floor, and is bounded by
  and monotone between the two. With a temperature schedule the observed T²-scaled divergence mixes
  temperatures; keep T fixed when α is adaptive, or observe a divergence at a fixed T.

Config syntax (strings or dicts, e.g. in a config file; `str(s)` / `s.to_dict()` give them back):

    0.5  or  "constant:0.5"               {"kind": "constant", "start": 0.5}
    "linear:0.9->0.3"                     {"kind": "linear", "start": 0.9, "end": 0.3}
    "cosine:0.9->0.3,hold=0.1"            {"kind": "cosine", "start": 0.9, "end": 0.3, "hold": 0.1}
    "adaptive:0.9->0.2,floor=0.3,decay=0.99,reference_steps=50"   (alpha only; other fields default)

`KDSchedule(alpha=..., temperature=...)` is what a trainer calls: `.at(step, total_steps) -> (alpha, T)` each
step, `.observe(soft_divergence)` after it, and `state_dict()` (plain JSON numbers) into the checkpoint so
that an exactly resumed run continues with the same α.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from kdarch.checks import check, choice_arg, fail, int_arg, is_int, number_arg

SCHEDULE_KINDS = ("constant", "linear", "cosine")
SPEC_KINDS = SCHEDULE_KINDS + ("adaptive",)
SYNTAX = '"KIND:START->END[,name=value...]" (KIND one of linear, cosine, adaptive), "constant:VALUE" or a number'


def _fmt(v) -> str:
    return str(v) if is_int(v) else repr(float(v))


@dataclass(frozen=True)
class Schedule:
    """A value as a function of training progress p = step / total_steps ∈ [0, 1]."""
    kind: str = "constant"
    """One of SCHEDULE_KINDS: "constant", "linear" or "cosine" (half cosine, flat at both ends)."""
    start: float = 1.0
    """Value at p = 0 (and throughout the hold)."""
    end: float | None = None
    """Value at p = 1; required for linear / cosine; a constant's is its start (None or equal)."""
    hold: float = 0.0
    """Fraction of training in [0, 1) that keeps `start` before the ramp begins."""

    def __post_init__(self):
        choice_arg("Schedule.kind", self.kind, SCHEDULE_KINDS)
        number_arg("Schedule.start", self.start)
        if self.kind == "constant":
            check(self.end is None or self.end == self.start, "Schedule.end",
                  f"None or the start ({self.start!r}): a constant schedule has only a start (use kind='linear' or "
                  f"'cosine' to move between values)", self.end)
            check(self.hold == 0, "Schedule.hold", "0: a constant schedule has nothing to hold", self.hold)
            object.__setattr__(self, "end", self.start)
        check(self.end is not None, "Schedule.end", f"the value at the end of training (required for "
              f"kind={self.kind!r})", self.end)
        number_arg("Schedule.end", self.end)
        number_arg("Schedule.hold", self.hold, min=0, max=1, max_open=True)

    def __call__(self, progress: float) -> float:
        number_arg("Schedule: progress", progress, min=0, max=1)
        if self.kind == "constant" or progress <= self.hold:
            return float(self.start)
        q = (progress - self.hold) / (1 - self.hold)
        shape = q if self.kind == "linear" else (1 - math.cos(math.pi * q)) / 2
        return float((1 - shape) * self.start + shape * self.end)  # exactly start / end at the ends

    def bounds(self) -> tuple[float, float]:
        return min(self.start, self.end), max(self.start, self.end)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "constant":
            return {"kind": "constant", "start": self.start}
        d = {"kind": self.kind, "start": self.start, "end": self.end}
        return d | ({"hold": self.hold} if self.hold else {})

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"constant:{_fmt(self.start)}"
        return f"{self.kind}:{_fmt(self.start)}->{_fmt(self.end)}" + (f",hold={_fmt(self.hold)}" if self.hold else "")


@dataclass(frozen=True)
class AdaptiveAlpha:
    """α from the ratio r of the student's current soft KD divergence (EMA) to its initial level (module docstring)."""
    start: float = 0.9
    """α while the divergence is at its initial level (r >= 1), in [0, 1]."""
    end: float = 0.1
    """α once the ratio has fallen to `floor`, in [0, 1]."""
    floor: float = 0.25
    """Ratio in [0, 1) at which α reaches `end`."""
    decay: float = 0.98
    """EMA decay per observation γ in [0, 1) (0: the last observation alone)."""
    reference_steps: int = 20
    """Observations (>= 1) averaged into the reference level; α stays at `start` until then."""
    kind: ClassVar[str] = "adaptive"

    def __post_init__(self):
        number_arg("AdaptiveAlpha.start", self.start, min=0, max=1)
        number_arg("AdaptiveAlpha.end", self.end, min=0, max=1)
        number_arg("AdaptiveAlpha.floor", self.floor, min=0, max=1, max_open=True)
        number_arg("AdaptiveAlpha.decay", self.decay, min=0, max=1, max_open=True)
        int_arg("AdaptiveAlpha.reference_steps", self.reference_steps, min=1)

    def alpha(self, ratio: float) -> float:
        """α(r) = end + (start − end) · clip((r − floor) / (1 − floor), 0, 1)."""
        s = min(1.0, max(0.0, (ratio - self.floor) / (1 - self.floor)))
        return float(s * self.start + (1 - s) * self.end)

    def bounds(self) -> tuple[float, float]:
        return min(self.start, self.end), max(self.start, self.end)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive"} | dataclasses.asdict(self)

    def __str__(self) -> str:
        extra = "".join(f",{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self)[2:]
                        if getattr(self, f.name) != f.default)
        return f"adaptive:{_fmt(self.start)}->{_fmt(self.end)}{extra}"


def _parse_number(text: str, spec: str) -> float | int:
    try:
        return int(text) if text.lstrip("+-").isdigit() else float(text)
    except ValueError:
        pass
    fail(f"schedule {spec!r}", f"numbers (syntax: {SYNTAX})", text)


def _from_dict(d: dict, spec) -> Schedule | AdaptiveAlpha:
    kind = choice_arg(f"schedule {spec!r}: kind", d.get("kind"), SPEC_KINDS)
    names = {f.name for f in dataclasses.fields(AdaptiveAlpha if kind == "adaptive" else Schedule)} - {"kind"}
    rest = {k: v for k, v in d.items() if k != "kind"}
    check(not set(rest) - names, f"schedule {spec!r}", f"only the keys {sorted(names)} (and kind) of a {kind} "
          f"schedule", sorted(set(rest) - names))
    return AdaptiveAlpha(**rest) if kind == "adaptive" else Schedule(kind, **rest)


def parse_schedule(spec) -> Schedule | AdaptiveAlpha:
    """A Schedule / AdaptiveAlpha from a number (constant), a string or a dict (module docstring); a Schedule
    or AdaptiveAlpha is returned as is."""
    if isinstance(spec, (Schedule, AdaptiveAlpha)):
        return spec
    if is_int(spec) or isinstance(spec, float):
        return Schedule("constant", spec)
    if isinstance(spec, dict):
        return _from_dict(spec, spec)
    check(isinstance(spec, str), "schedule", "a number, a string or a dict", spec)
    text = spec.replace(" ", "")
    if ":" not in text:
        return Schedule("constant", _parse_number(text, spec))
    kind, _, rest = text.partition(":")
    check(kind in SPEC_KINDS, f"schedule {spec!r}: kind",
          f"one of {', '.join(map(repr, SPEC_KINDS))} (syntax: {SYNTAX})", kind)
    values, *options = rest.split(",")
    ends = values.split("->")
    check(len(ends) == (1 if kind == "constant" else 2), f"schedule {spec!r}",
          f"{'one value' if kind == 'constant' else 'START->END'} after '{kind}:' (syntax: {SYNTAX})", values)
    fields = {"kind": kind, "start": _parse_number(ends[0], spec)} | \
        ({"end": _parse_number(ends[1], spec)} if len(ends) == 2 else {})
    for opt in options:
        name, eq, value = opt.partition("=")
        check(bool(eq) and name not in fields, f"schedule {spec!r}",
              "name=value options after the values (not start, end or kind)", opt)
        fields[name] = _parse_number(value, spec)
    return _from_dict(fields, spec)


class KDSchedule:
    """α and T at each training step; feeds the adaptive α rule and saves its state for an exact resume.

    alpha: anything `parse_schedule` takes, including an AdaptiveAlpha (values in [0, 1]); temperature: a
    Schedule spec (values > 0). Trainer loop: `alpha, T = sched.at(step, total_steps)`, compute the loss,
    `sched.observe(terms.soft.item())` (a no-op unless α is adaptive); checkpoint `sched.state_dict()`."""

    def __init__(self, alpha=0.5, temperature=1.0):
        self.alpha = parse_schedule(alpha)
        self.temperature = parse_schedule(temperature)
        lo, hi = self.alpha.bounds()
        check(lo >= 0 and hi <= 1, "KDSchedule.alpha", "a schedule with values in [0, 1]", str(self.alpha))
        check(not isinstance(self.temperature, AdaptiveAlpha), "KDSchedule.temperature",
              f"a schedule of kind {', '.join(SCHEDULE_KINDS)} (the adaptive rule is for alpha only)",
              str(self.temperature))
        check(self.temperature.bounds()[0] > 0, "KDSchedule.temperature", "a schedule with values > 0",
              str(self.temperature))
        self._n, self._ema, self._ref_sum = 0, 0.0, 0.0

    @property
    def adaptive(self) -> bool:
        return isinstance(self.alpha, AdaptiveAlpha)

    @property
    def ratio(self) -> float | None:
        """Current EMA divergence over the reference level; None until the reference is set (or not adaptive)."""
        if not self.adaptive or self._n < self.alpha.reference_steps:
            return None
        ref = self._ref_sum / self.alpha.reference_steps
        return self._ema / ref if ref > 0 else 1.0  # a student that starts on the teacher has nothing to catch up

    def at(self, step: int, total_steps: int) -> tuple[float, float]:
        """(alpha, temperature) for `step` of `total_steps` (0 <= step <= total_steps)."""
        int_arg("KDSchedule.at: total_steps", total_steps, min=1)
        int_arg("KDSchedule.at: step", step, min=0, max=total_steps)
        p = step / total_steps
        if self.adaptive:
            r = self.ratio
            alpha = self.alpha.alpha(1.0 if r is None else r)
        else:
            alpha = self.alpha(p)
        return alpha, self.temperature(p)

    def observe(self, soft_divergence) -> None:
        """Record this step's soft KD divergence (a float or a 0-dim tensor; negative rounding noise counts as 0)."""
        if not self.adaptive:
            return
        d = max(number_arg("KDSchedule.observe: soft_divergence", float(soft_divergence)), 0.0)
        self._n += 1
        self._ema = d if self._n == 1 else self.alpha.decay * self._ema + (1 - self.alpha.decay) * d
        if self._n <= self.alpha.reference_steps:
            self._ref_sum += d

    def state_dict(self) -> dict[str, float | int]:
        """The adaptive rule's running state as JSON numbers ({} for a fixed α)."""
        return {"observations": self._n, "ema": self._ema, "reference_sum": self._ref_sum} if self.adaptive else {}

    def load_state_dict(self, state: dict) -> None:
        want = set(self.state_dict())
        check(isinstance(state, dict) and set(state) == want, "KDSchedule.load_state_dict: state",
              f"a dict with the keys {sorted(want)} (alpha={self.alpha})",
              sorted(state) if isinstance(state, dict) else state)
        if want:
            int_arg("KDSchedule.load_state_dict: state['observations']", state["observations"], min=0)
            number_arg("KDSchedule.load_state_dict: state['ema']", state["ema"], min=0)
            number_arg("KDSchedule.load_state_dict: state['reference_sum']", state["reference_sum"], min=0)
            self._n, self._ema = state["observations"], float(state["ema"])
            self._ref_sum = float(state["reference_sum"])

    def __repr__(self) -> str:
        return f"KDSchedule(alpha={str(self.alpha)!r}, temperature={str(self.temperature)!r})"
