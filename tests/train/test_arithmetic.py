"""The arithmetic task against Python's own `eval` and an independent step writer (written out here), plus the
grading rules on edge cases, config and input validation."""
import random
import re

import pytest

from kdarch.config import ConfigError
from kdarch.train.arithmetic import (
    ALPHABET,
    END,
    ArithmeticConfig,
    CurateStats,
    Problem,
    check,
    check_steps,
    curate,
    exact_match,
    generate_problems,
    parse_answer,
    prompt,
    sample_text,
    solution,
)

CONFIGS = [
    ArithmeticConfig(),
    ArithmeticConfig(allow_negative=True),
    ArithmeticConfig(min_ops=1, max_ops=5, min_digits=1, max_digits=3, mul_max_digits=2, allow_negative=True),
    ArithmeticConfig(operators="*", min_ops=1, max_ops=4),
    ArithmeticConfig(operators="-+", min_ops=4, max_ops=4, min_digits=2, max_digits=2, mul_max_digits=2,
                     allow_negative=True),
]


# ------------------------------------------------------------------ independent reference (no kdarch code)
def ref_solution(expr: str) -> tuple[str, int]:
    """Worked solution by grouping products into terms: each product left to right, then the terms' sums and
    differences left to right; returns (solution text, value)."""
    tokens = re.split(r"([-+*])", expr)
    terms, signs = [[int(tokens[0])]], []
    for op, v in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            terms[-1].append(int(v))
        else:
            signs.append(op)
            terms.append([int(v)])
    lines, values = [], []
    for term in terms:
        acc = term[0]
        for v in term[1:]:
            lines.append(f"{acc}*{v}={acc * v}")
            acc *= v
        values.append(acc)
    acc = values[0]
    for sign, v in zip(signs, values[1:]):
        new = acc + v if sign == "+" else acc - v
        lines.append(f"{acc}{sign}{v}={new}")
        acc = new
    return "\n".join(lines) + f"\nA: {acc}$", acc


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs, field", [
    (dict(min_ops=0), "min_ops"), (dict(min_ops=True), "min_ops"), (dict(min_ops=2.0), "min_ops"),
    (dict(min_ops=3, max_ops=2), "max_ops"), (dict(min_digits=0), "min_digits"),
    (dict(min_digits=2, max_digits=1, mul_max_digits=1), "max_digits"),
    (dict(mul_max_digits=3), "mul_max_digits"), (dict(min_digits=2, mul_max_digits=1), "mul_max_digits"),
    (dict(operators=""), "operators"), (dict(operators="/"), "operators"), (dict(operators="++"), "operators"),
    (dict(operators=["+"]), "operators"), (dict(allow_negative=1), "allow_negative"),
])
def test_config_rejects_bad_fields(kwargs, field):
    with pytest.raises(ConfigError, match=rf"ArithmeticConfig\.{field}: expected"):
        ArithmeticConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        ArithmeticConfig().max_ops = 5


# ------------------------------------------------------------------ generation
@pytest.mark.parametrize("cfg", CONFIGS)
def test_generation_is_deterministic_and_follows_config(cfg):
    ps = generate_problems(500, cfg, seed=7)
    assert ps == generate_problems(500, cfg, seed=7)
    assert ps != generate_problems(500, cfg, seed=8)
    assert generate_problems(120, cfg, seed=7) == ps[:120]          # a smaller request is a prefix
    assert len(set(ps)) == len(ps)
    for p in ps:
        assert cfg.min_ops <= len(p.operators) <= cfg.max_ops and set(p.operators) <= set(cfg.operators)
        for i, v in enumerate(p.operands):
            next_to_mul = "*" in p.operators[max(i - 1, 0):i + 1]
            assert cfg.min_digits <= len(str(v)) <= (cfg.mul_max_digits if next_to_mul else cfg.max_digits)
        if not cfg.allow_negative:
            assert all(s.result >= 0 for s in p.steps)
    if cfg.allow_negative and "-" in cfg.operators:
        assert any(p.answer < 0 for p in ps)
    assert len({len(p.operators) for p in ps}) == cfg.max_ops - cfg.min_ops + 1    # every length occurs


def test_unique_exclude_and_exhaustion():
    cfg = ArithmeticConfig(min_ops=1, max_ops=1, max_digits=1, operators="+")     # 100 problems in all
    assert len(set(generate_problems(100, cfg, seed=0))) == 100
    assert len(set(generate_problems(300, cfg, seed=0, unique=False))) < 300
    with pytest.raises(ValueError, match="too few problems"):
        generate_problems(101, cfg, seed=0)
    test = generate_problems(40, cfg, seed=1)
    train = generate_problems(60, cfg, seed=2, exclude=test)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 100
    big_test = generate_problems(300, seed=1)
    assert not set(generate_problems(3000, seed=0, exclude=big_test)) & set(big_test)


@pytest.mark.parametrize("call, err, match", [
    (lambda: generate_problems(-1), ValueError, "n: expected"),
    (lambda: generate_problems(2.0), ValueError, "n: expected"),
    (lambda: generate_problems(3, {"max_ops": 2}), TypeError, "cfg: expected an ArithmeticConfig"),
    (lambda: generate_problems(3, exclude=["1+2"]), TypeError, "exclude: expected"),
])
def test_generate_rejects_bad_arguments(call, err, match):
    with pytest.raises(err, match=match):
        call()


# ------------------------------------------------------------------ reference solutions
@pytest.mark.parametrize("cfg", CONFIGS)
def test_reference_solutions_match_eval_and_independent_steps(cfg):
    for p in generate_problems(2000, cfg, seed=3):
        ref_text, ref_value = ref_solution(p.expression)
        assert p.answer == ref_value == eval(p.expression)
        assert solution(p) == ref_text and prompt(p) == f"Q: {p.expression}\n"
        text = sample_text(p)
        assert text == prompt(p) + solution(p) and set(text) <= set(ALPHABET)
        assert text.count(END) == 1 and text.endswith(END)
        assert check(p, solution(p)) and check_steps(p, solution(p)) and parse_answer(solution(p)) == p.answer
        assert check(p, text) and check_steps(p, text)                # a leading copy of the prompt is tolerated
        assert Problem.from_expression(p.expression) == p
        if cfg == ArithmeticConfig():
            assert len(text) <= 54                                    # the bound stated in the module docstring


def test_worked_example_and_precedence():
    p = Problem.from_expression("37+8*6-15")
    assert sample_text(p) == "Q: 37+8*6-15\n8*6=48\n37+48=85\n85-15=70\nA: 70$"
    p = Problem((2, 3, 4, 5, 6), ("*", "+", "*", "-"))
    assert solution(p) == "2*3=6\n4*5=20\n6+20=26\n26-6=20\nA: 20$" and p.answer == 20
    assert Problem.from_expression("10-3+4").answer == 11                 # left to right, not 10-(3+4)
    assert Problem.from_expression("3-9").steps[0].result == -6


@pytest.mark.parametrize("operands, operators, field", [
    ((1,), (), "operands"), ((1, -2), ("+",), "operands"), ((1, True), ("+",), "operands"),
    ((1, 2.0), ("+",), "operands"), ((1, 2), (), "operators"), ((1, 2), ("/",), "operators"),
    ((1, 2), ("+", "+"), "operators"),
])
def test_problem_rejects_bad_input(operands, operators, field):
    with pytest.raises(ValueError, match=rf"Problem\.{field}: expected"):
        Problem(operands, operators)


@pytest.mark.parametrize("text", ["", "7", "1+", "+1", "1/2", "01+2", "-1+2", "1 + 2", "1+2\n3", None])
def test_from_expression_rejects_garbage(text):
    with pytest.raises(ValueError, match="expected an expression"):
        Problem.from_expression(text)


# ------------------------------------------------------------------ grading
@pytest.mark.parametrize("completion, answer", [
    ("1+2=3\nA: 3$", 3), ("A: -12$", -12), ("A: 0", 0), ("A: 12", 12), ("A:  5  \n", 5), ("A:5$", 5),
    ("A: 5\nextra text after the answer$", 5), ("A: 5$A: 7", 5), ("x\nA: 5\nA: 7$", 5),
    ("A: x\nA: 5$", None),                                                # the first answer line counts
    ("1+2=3\n", None), ("", None), ("$A: 5", None), ("a: 5", None), ("A: $", None), ("A: 5x$", None),
    ("A: 5 6$", None), ("A: 05$", None), ("A: -0$", None), ("A: 1.5$", None), ("A: --3$", None),
])
def test_parse_answer(completion, answer):
    assert parse_answer(completion) == answer


def test_grading_rejects_non_strings():
    p = Problem.from_expression("1+2")
    for fn in (parse_answer, lambda c: check(p, c), lambda c: check_steps(p, c)):
        with pytest.raises(TypeError, match="completion: expected str"):
            fn(b"A: 3$")


@pytest.mark.parametrize("completion", [
    "2+3=6\n6+4=9\nA: 9$",                   # wrong arithmetic, right answer
    "2+4=6\n6+3=9\nA: 9$",                   # right arithmetic, steps out of order
    "2+3=5\nA: 9$",                          # a step missing
    "2+3=5\n5+4=9\n5+4=9\nA: 9$",            # an extra step
    "2+3=5\n\n5+4=9\nA: 9$",                 # a blank line
    "2 + 3 = 5\n5+4=9\nA: 9$",               # not the step format
    "02+3=5\n5+4=9\nA: 9$",                  # non-canonical number
    "2+3=5\n5+4=9\n",                        # no answer
    "2+3=5\n5+4=9\nA: 10$",                  # wrong answer
    "A: 9$",                                 # answer alone
])
def test_check_steps_rejects(completion):
    p = Problem.from_expression("2+3+4")
    assert not check_steps(p, completion)
    assert check(p, completion) == (parse_answer(completion) == 9)


@pytest.mark.parametrize("completion", [
    "2+3=5\n5+4=9\nA: 9$", "2+3=5\n5+4=9\nA: 9", "2+3=5\n5+4=9\nA: 9\nnoise$", "2+3=5\n5+4=9\nA: 9$junk",
    " 2+3=5 \n5+4=9\nA: 9 $", "Q: 2+3+4\n2+3=5\n5+4=9\nA: 9$",
])
def test_check_steps_accepts(completion):
    assert check_steps(Problem.from_expression("2+3+4"), completion)


def test_check_steps_rejects_every_corrupted_step():
    rng = random.Random(0)
    for p in generate_problems(300, ArithmeticConfig(allow_negative=True), seed=5):
        lines = solution(p).split("\n")
        i = rng.randrange(len(p.steps))
        s = p.steps[i]
        lines[i] = f"{s.left}{s.op}{s.right}={s.result + rng.choice([-10, -1, 1, 2])}"
        corrupted = "\n".join(lines)
        assert check(p, corrupted) and not check_steps(p, corrupted)


# ------------------------------------------------------------------ curation and exact match
def test_curate_counts_and_cleans():
    p, q, r = (Problem.from_expression(e) for e in ("2+3+4", "9*2-5", "7-1*3"))
    completions = [
        solution(p),                         # right steps, right answer
        "2+3=6\n6+4=9\nA: 9$",               # wrong step, right answer
        "9*2=18\n18-5=13\nA: 12$",           # wrong answer
        "garbage",                           # no answer
        "1*3=3\n7-3=4\nA:  4 \nnoise$more",  # right, with blanks and text after the answer
        "2+3=5\n5+4=9\nA: 9",                # right, END missing (a caller that strips it)
    ]
    problems = [p, p, q, q, r, p]
    kept, stats = curate(problems, completions)
    assert stats == CurateStats(total=6, correct=4, valid_steps=3, kept=3)
    assert kept == [(p, solution(p)), (r, solution(r)), (p, solution(p))]
    kept, stats = curate(problems, completions, strict=False)
    assert stats == CurateStats(total=6, correct=4, valid_steps=3, kept=4)
    assert [k[1] for k in kept] == [solution(p), "2+3=6\n6+4=9\nA: 9$", solution(r), solution(p)]
    assert curate([], []) == ([], CurateStats(0, 0, 0, 0))


def test_exact_match():
    ps = generate_problems(4, seed=0)
    right = [solution(p) for p in ps]
    assert exact_match(ps, right) == 1.0
    assert exact_match(ps, right[:3] + [f"A: {ps[3].answer + 1}$"]) == 0.75
    assert exact_match(ps, ["A: 7x"] * 4) == 0.0
    with pytest.raises(ValueError, match="at least one problem"):
        exact_match([], [])


@pytest.mark.parametrize("fn", [curate, exact_match])
def test_pairing_errors(fn):
    ps = generate_problems(3, seed=0)
    with pytest.raises(ValueError, match="one completion per problem"):
        fn(ps, ["A: 1$"] * 2)
    with pytest.raises(TypeError, match="sequence of Problem"):
        fn(["1+2"], ["A: 3$"])
