"""α / T schedules: values at p = 0, ½, 1 against their formulas, the hold, monotonicity, the config syntax
(round trips and errors); the adaptive α rule: its formula, bounds, monotonicity in the divergence ratio,
the EMA and reference, and an exact resume from a JSON state."""
import json
import math

import pytest
import torch

from kdarch.distill.schedules import AdaptiveAlpha, KDSchedule, Schedule, parse_schedule

GRID = [i / 100 for i in range(101)]


@pytest.mark.parametrize("kind,mid", [("constant", 0.9), ("linear", 0.6), ("cosine", 0.6)])
def test_values_at_start_middle_end(kind, mid):
    s = Schedule(kind, 0.9, None if kind == "constant" else 0.3)
    assert s(0.0) == 0.9
    assert s(0.5) == pytest.approx(mid, abs=1e-12)
    assert s(1.0) == (0.9 if kind == "constant" else 0.3)


def test_against_formulas_with_hold():
    lin, cos = Schedule("linear", 4.0, 1.0, hold=0.2), Schedule("cosine", 4.0, 1.0, hold=0.2)
    for p in GRID:
        q = max(0.0, (p - 0.2) / 0.8)
        assert lin(p) == pytest.approx(4.0 - 3.0 * q, abs=1e-12)
        assert cos(p) == pytest.approx(1.0 + 3.0 * 0.5 * (1 + math.cos(math.pi * q)), abs=1e-12)
    assert lin(0.2) == cos(0.2) == 4.0 and lin(0.1) == 4.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("start,end", [(0.9, 0.1), (1.0, 4.0)])
def test_monotone_and_bounded(kind, start, end):
    vals = [Schedule(kind, start, end, hold=0.1)(p) for p in GRID]
    steps = [b - a for a, b in zip(vals, vals[1:])]
    assert all(d * (end - start) >= 0 for d in steps)  # never moves away from end
    assert all(min(start, end) <= v <= max(start, end) for v in vals)
    if kind == "cosine":  # flat at both ends, steepest in the middle
        assert abs(steps[0]) < abs(steps[55]) and abs(steps[-1]) < abs(steps[55])


SPECS = [
    ("0.7", Schedule("constant", 0.7)),
    ("constant:2", Schedule("constant", 2)),
    ("linear:0.9->0.3", Schedule("linear", 0.9, 0.3)),
    (" cosine: 0.9 -> 0.3 , hold=0.1 ", Schedule("cosine", 0.9, 0.3, 0.1)),
    ("cosine:1->4", Schedule("cosine", 1.0, 4.0)),
    ("adaptive:0.9->0.2", AdaptiveAlpha(0.9, 0.2)),
    ("adaptive:0.8->0,floor=0.3,decay=0.99,reference_steps=50", AdaptiveAlpha(0.8, 0.0, 0.3, 0.99, 50)),
    ({"kind": "cosine", "start": 0.9, "end": 0.3}, Schedule("cosine", 0.9, 0.3)),
    ({"kind": "adaptive", "end": 0.05}, AdaptiveAlpha(end=0.05)),
    (0.5, Schedule("constant", 0.5)),
]


@pytest.mark.parametrize("spec,want", SPECS)
def test_parse_and_round_trips(spec, want):
    s = parse_schedule(spec)
    assert s == want
    assert parse_schedule(str(s)) == s
    assert parse_schedule(json.loads(json.dumps(s.to_dict()))) == s
    assert parse_schedule(s) is s


def test_canonical_strings():
    assert str(parse_schedule("cosine:0.9->0.3,hold=0.1")) == "cosine:0.9->0.3,hold=0.1"
    assert str(parse_schedule(0.5)) == "constant:0.5"
    assert str(AdaptiveAlpha(0.9, 0.2, decay=0.9)) == "adaptive:0.9->0.2,decay=0.9"


SYNTAX = (r'\(syntax: "KIND:START->END\[,name=value\.\.\.\]" \(KIND one of linear, cosine, adaptive\), '
          r'"constant:VALUE" or a number\)')


@pytest.mark.parametrize("spec,msg", [
    ("cosin:0.9->0.3", r"^schedule 'cosin:0\.9->0\.3': kind: expected one of 'constant', 'linear', 'cosine', "
                       rf"'adaptive' {SYNTAX}, got 'cosin'$"),
    ("linear:0.9", rf"^schedule 'linear:0\.9': expected START->END after 'linear:' {SYNTAX}, got '0\.9'$"),
    ("constant:0.9->0.3", rf"^schedule 'constant:0\.9->0\.3': expected one value after 'constant:' {SYNTAX}, "
                          r"got '0\.9->0\.3'$"),
    ("linear:a->0.3", rf"^schedule 'linear:a->0\.3': expected numbers {SYNTAX}, got 'a'$"),
    ("cosine:0.9->0.3,hold", r"^schedule 'cosine:0\.9->0\.3,hold': expected name=value options after the values "
                             r"\(not start, end or kind\), got 'hold'$"),
    ("cosine:0.9->0.3,start=1", r"expected name=value options after the values \(not start, end or kind\), "
                                r"got 'start=1'$"),
    ("cosine:0.9->0.3,warm=0.1", r"^schedule 'cosine:0\.9->0\.3,warm=0\.1': expected only the keys \['end', 'hold', "
                                 r"'start'\] \(and kind\) of a cosine schedule, got \['warm'\]$"),
    ("cosine:0.9->0.3,hold=1", r"^Schedule.hold: expected a finite number in \[0, 1\), got 1$"),
    ("linear:nan->1", r"^Schedule.start: expected a finite number, got nan$"),
    ({"kind": "linear", "start": 0.9}, r"^Schedule.end: expected the value at the end of training \(required for "
                                       r"kind='linear'\), got None$"),
    ({"start": 0.9}, r"^schedule \{'start': 0\.9\}: kind: expected one of 'constant', 'linear', 'cosine', "
                     r"'adaptive', got None$"),
    ({"kind": "constant", "start": 0.5, "end": 0.4}, r"^Schedule.end: expected None or the start \(0\.5\): a constant "
                                                     r"schedule has only a start .*, got 0\.4$"),
    ({"kind": "constant", "start": 0.5, "hold": 0.1}, r"^Schedule.hold: expected 0: a constant schedule has nothing "
                                                      r"to hold, got 0\.1$"),
    ({"kind": "linear", "start": True, "end": 0.1}, r"^Schedule.start: expected a finite number, got True$"),
    ("adaptive:1.5->0.1", r"^AdaptiveAlpha.start: expected a finite number in \[0, 1\], got 1\.5$"),
    ("adaptive:0.9->0.1,floor=1", r"^AdaptiveAlpha.floor: expected a finite number in \[0, 1\), got 1$"),
    ("adaptive:0.9->0.1,reference_steps=0.5", r"^AdaptiveAlpha.reference_steps: expected an int >= 1, got 0\.5$"),
    ([0.5], r"^schedule: expected a number, a string or a dict, got \[0\.5\]$"),
])
def test_parse_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_schedule(spec)


def test_kd_schedule_at():
    sched = KDSchedule(alpha="cosine:0.9->0.1", temperature="linear:4->1")
    assert sched.at(0, 10) == (0.9, 4.0)
    assert sched.at(5, 10) == pytest.approx((0.5, 2.5))
    assert sched.at(10, 10) == (0.1, 1.0)
    assert KDSchedule().at(3, 7) == (0.5, 1.0)
    assert repr(sched) == "KDSchedule(alpha='cosine:0.9->0.1', temperature='linear:4->1')"
    sched.observe(1.0)  # a fixed α ignores observations
    assert sched.state_dict() == {} and sched.ratio is None


@pytest.mark.parametrize("kw,msg", [
    (dict(alpha="linear:0.5->1.5"), r"^KDSchedule.alpha: expected a schedule with values in \[0, 1\], got "
                                    r"'linear:0\.5->1\.5'$"),
    (dict(alpha=-0.1), r"^KDSchedule.alpha: expected a schedule with values in \[0, 1\], got 'constant:-0\.1'$"),
    (dict(temperature="cosine:2->0"), r"^KDSchedule.temperature: expected a schedule with values > 0, got "
                                      r"'cosine:2->0'$"),
    (dict(temperature="adaptive:0.9->0.1"), r"^KDSchedule.temperature: expected a schedule of kind constant, linear, "
                                            r"cosine \(the adaptive rule is for alpha only\), got "
                                            r"'adaptive:0\.9->0\.1'$"),
])
def test_kd_schedule_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        KDSchedule(**kw)


@pytest.mark.parametrize("step,total,msg", [
    (-1, 10, r"^KDSchedule.at: step: expected an int in \[0, 10\], got -1$"),
    (11, 10, r"^KDSchedule.at: step: expected an int in \[0, 10\], got 11$"),
    (0, 0, r"^KDSchedule.at: total_steps: expected an int >= 1, got 0$"),
    (0.5, 10, r"^KDSchedule.at: step: expected an int in \[0, 10\], got 0\.5$"),
    (True, 10, r"^KDSchedule.at: step: expected an int in \[0, 10\], got True$"),
])
def test_at_errors(step, total, msg):
    with pytest.raises(ValueError, match=msg):
        KDSchedule().at(step, total)


def test_adaptive_formula_bounds_and_monotone():
    rule = AdaptiveAlpha(start=0.9, end=0.2, floor=0.25)
    ratios = [i / 20 for i in range(41)]  # 0 .. 2
    vals = [rule.alpha(r) for r in ratios]
    for r, v in zip(ratios, vals):
        want = 0.2 + 0.7 * min(1.0, max(0.0, (r - 0.25) / 0.75))
        assert v == pytest.approx(want, abs=1e-12) and 0.2 <= v <= 0.9
    assert all(b >= a for a, b in zip(vals, vals[1:]))  # falls (weakly) with the ratio
    assert rule.alpha(1.0) == rule.alpha(3.0) == 0.9 and rule.alpha(0.25) == rule.alpha(0.0) == 0.2


def test_adaptive_alpha_follows_the_divergence():
    rule = AdaptiveAlpha(start=0.9, end=0.1, floor=0.2, decay=0.5, reference_steps=3)
    sched = KDSchedule(alpha=rule, temperature=2.0)
    alphas = []
    for step, d in enumerate([4.0, 6.0, 5.0]):  # reference: mean 5; α stays at start meanwhile
        assert sched.at(step, 100) == (0.9, 2.0)
        sched.observe(torch.tensor(d))
    ema = 4.0
    for d in [6.0, 5.0]:
        ema = 0.5 * ema + 0.5 * d
    assert sched.ratio == pytest.approx(ema / 5.0)
    for d in [4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.0, -1e-9]:  # the student catches up
        sched.observe(d)
        ema = 0.5 * ema + 0.5 * max(d, 0.0)
        assert sched.ratio == pytest.approx(ema / 5.0)
        alphas.append(sched.at(50, 100)[0])
        assert alphas[-1] == pytest.approx(rule.alpha(ema / 5.0))
    assert all(b <= a for a, b in zip(alphas, alphas[1:])) and alphas[0] < 0.9 and alphas[-1] == 0.1
    sched.observe(50.0)  # the divergence jumps back above the reference: α is capped at start
    assert sched.at(60, 100)[0] == 0.9
    with pytest.raises(ValueError, match=r"^KDSchedule.observe: soft_divergence: expected a finite number, got nan$"):
        sched.observe(float("nan"))


def test_adaptive_state_round_trip_is_an_exact_resume():
    spec = "adaptive:0.9->0.1,decay=0.9,reference_steps=4"
    data = [3.1, 2.9, 3.3, 3.0, 2.5, 2.2, 1.9, 1.7, 1.2, 1.0, 0.9, 0.7]
    ref, resumed = KDSchedule(spec), KDSchedule(spec)
    for d in data[:6]:
        ref.observe(d)
    resumed.load_state_dict(json.loads(json.dumps(ref.state_dict())))
    assert resumed.state_dict() == ref.state_dict()
    for step, d in enumerate(data[6:], start=6):
        assert resumed.at(step, 12) == ref.at(step, 12)
        ref.observe(d)
        resumed.observe(d)
    assert resumed.ratio == ref.ratio and resumed.at(12, 12) == ref.at(12, 12)


def test_load_state_dict_errors():
    sched = KDSchedule("adaptive:0.9->0.1")
    with pytest.raises(ValueError, match=r"^KDSchedule.load_state_dict: state: expected a dict with the keys \['ema', "
                                         r"'observations', 'reference_sum'\] \(alpha=adaptive:0\.9->0\.1\), got \[\]$"):
        sched.load_state_dict({})
    with pytest.raises(ValueError, match=r"^KDSchedule.load_state_dict: state: expected a dict with the keys \[\] "
                                         r"\(alpha=constant:0\.5\), got \['ema', 'observations', 'reference_sum'\]$"):
        KDSchedule(0.5).load_state_dict(sched.state_dict())
    with pytest.raises(ValueError, match=r"^KDSchedule.load_state_dict: state\['observations'\]: expected an int >= 0, "
                                         r"got -1$"):
        sched.load_state_dict({"observations": -1, "ema": 0.0, "reference_sum": 0.0})
    with pytest.raises(ValueError, match=r"^KDSchedule.load_state_dict: state\['ema'\]: expected a finite number >= 0, "
                                         r"got inf$"):
        sched.load_state_dict({"observations": 3, "ema": float("inf"), "reference_sum": 1.0})
