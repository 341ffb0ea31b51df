"""Multi-step integer arithmetic with worked solutions: the checkable task of sequence-level distillation.

Sequence-level ("reasoning") distillation needs a task whose answers a program can check, so that a filter can
keep the teacher's correct solutions and drop the rest (DeepSeek-R1's distilled models were trained on data
curated this way). Short expressions over small integers fit models of a few hundred thousand parameters: every
line of a worked solution is one binary operation on numbers already on the page, so each step is small and
locally checkable, while the whole problem still needs several dependent steps. This module only makes problems,
writes their text and grades completions; the caller does the generation, so nothing here imports the model or
the trainer.

Order of operations: standard precedence, as in Python and school arithmetic: every `*` first, leftmost first,
then `+` and `-` left to right. `Problem.answer` is therefore Python's `eval` of the expression. Operands are
non-negative literals; intermediate results may go negative only when `ArithmeticConfig.allow_negative`.

Text format (ASCII only, so characters = UTF-8 bytes = `ByteTokenizer` tokens; `ALPHABET` lists every character):

    prompt(p)       "Q: 37+8*6-15\\n"
    solution(p)     "8*6=48\\n37+48=85\\n85-15=70\\nA: 70$"     one line "a<op>b=c" per step, then the answer
    sample_text(p)  prompt(p) + solution(p)

`END` ("$") closes every solution: a generator stops at its token. Numbers are written canonically (no leading
zeros, no "-0"). Grading reads a completion (the text generated after the prompt; a leading copy of the prompt is
tolerated) up to its first `END` and ignores the rest:
  - `parse_answer`: the first line starting with "A:" is the answer; it counts even if more "A:" lines follow
    (the model committed to it), and anything else on that line but blanks makes the answer garbled (None).
  - `check`: that answer equals `Problem.answer`.
  - `check_steps` (stricter, for curating teacher output): additionally every line before the answer is a step
    in the format above, each step is the next operation in the documented order with correct arithmetic, and
    no step is missing or extra. The order is fixed on purpose: the student is taught one procedure, and a right
    answer reached through a wrong or skipped step is rejected.

Lengths with the defaults (2-3 operations on 1-2 digit operands, 1-digit factors; 10,000 problems, seed 0), in
characters = bytes = `ByteTokenizer` tokens: prompt 10.9 mean / 15 max, solution 25.5 / 39, sample_text 36.5 / 54.
The longest possible sample is 54 ("Q: 99+99+99+99" and its solution), so a context of 64 tokens holds every
sample and teacher generation needs at most 39 new tokens. With `allow_negative`: sample_text 37.4 mean, at most
58 ("Q: 10-99-99-99"), solution at most 43.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kdarch.checks import ConfigError, check_field_types, int_arg, is_int
from kdarch.checks import check as require

OPERATORS = "+-*"
"""Every operator the task knows (ASCII: '-' is minus, '*' is times)."""
END = "$"
"""End-of-solution marker; generation stops when it is produced."""
ALPHABET = "0123456789" + OPERATORS + "=:AQ \n" + END
"""Every character a prompt or solution can contain (a complete vocabulary for a char-level tokenizer)."""

_NAT = r"(?:0|[1-9]\d*)"                      # a canonical non-negative integer
_INT = r"(?:0|-?[1-9]\d*)"                   # a canonical integer
_STEP_RE = re.compile(rf"\s*({_INT})([-+*])({_NAT})=({_INT})\s*")
_ANSWER_RE = re.compile(rf"A:\s*({_INT})\s*")
_EXPR_RE = re.compile(rf"{_NAT}(?:[-+*]{_NAT})+")


@dataclass(frozen=True)
class ArithmeticConfig:
    """How problems are drawn. The defaults are learnable by a ~1M-parameter model in a few thousand steps."""

    min_ops: int = 2
    """Fewest operations per problem (each is one line of the worked solution); >= 1."""
    max_ops: int = 3
    """Most operations per problem; >= min_ops. The number is drawn uniformly in [min_ops, max_ops]."""
    min_digits: int = 1
    """Fewest digits of an operand; >= 1. One-digit operands include 0."""
    max_digits: int = 2
    """Most digits of an operand; >= min_digits. An operand's digit count is drawn uniformly first, then its
    value uniformly among numbers of that many digits, so short and long operands are equally common."""
    mul_max_digits: int = 1
    """Most digits of an operand next to a '*', in [min_digits, max_digits]; keeps every product small enough
    to be computed in one step."""
    operators: str = OPERATORS
    """Operators to draw from, uniformly per operation: a non-empty string of distinct characters of "+-*"."""
    allow_negative: bool = False
    """Allow negative intermediate results and answers; when False such problems are redrawn."""

    def __post_init__(self) -> None:
        check_field_types(self, "ArithmeticConfig")
        for name in ("min_ops", "max_ops", "min_digits", "max_digits", "mul_max_digits"):
            _check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        _check(self.max_ops >= self.min_ops, "max_ops", f"an int >= min_ops={self.min_ops}", self.max_ops)
        _check(self.max_digits >= self.min_digits, "max_digits", f"an int >= min_digits={self.min_digits}",
               self.max_digits)
        _check(self.min_digits <= self.mul_max_digits <= self.max_digits, "mul_max_digits",
               f"an int in [min_digits={self.min_digits}, max_digits={self.max_digits}]", self.mul_max_digits)
        ops = self.operators
        _check(len(ops) > 0 and set(ops) <= set(OPERATORS) and len(set(ops)) == len(ops), "operators",
               f"a non-empty string of distinct characters from {OPERATORS!r}", ops)


def _check(ok: bool, name: str, expected: str, got) -> None:
    require(ok, f"ArithmeticConfig.{name}", expected, got, error=ConfigError)


class Step(NamedTuple):
    """One line of a worked solution: `left op right = result`."""

    left: int
    op: str
    right: int
    result: int

    def __str__(self) -> str:
        return f"{self.left}{self.op}{self.right}={self.result}"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class Problem:
    """An expression `operands[0] operators[0] operands[1] ...` over non-negative integer literals."""

    operands: tuple[int, ...]
    """The literals, left to right; at least two."""
    operators: tuple[str, ...]
    """The operators between them, each one of "+-*"; one fewer than operands."""
    steps: tuple[Step, ...] = field(init=False, repr=False, compare=False)
    """The reference worked solution: one operation per step in the documented order."""

    def __post_init__(self) -> None:
        operands, operators = tuple(self.operands), tuple(self.operators)
        require(len(operands) >= 2 and all(is_int(v) and v >= 0 for v in operands), "Problem.operands",
                "at least two non-negative ints", self.operands)
        if len(operators) != len(operands) - 1 or not all(op in OPERATORS for op in operators):
            raise ValueError(f"Problem.operators: expected {len(operands) - 1} operators from {OPERATORS!r}, "
                             f"got {self.operators!r}")
        object.__setattr__(self, "operands", operands)
        object.__setattr__(self, "operators", operators)
        values, ops, steps = list(operands), list(operators), []
        while ops:                                    # reduce the expression one operation at a time
            i = ops.index("*") if "*" in ops else 0
            step = Step(values[i], ops[i], values[i + 1], _apply(values[i], ops[i], values[i + 1]))
            values[i:i + 2], ops[i:i + 1] = [step.result], []
            steps.append(step)
        object.__setattr__(self, "steps", tuple(steps))

    @property
    def expression(self) -> str:
        """The expression as written in the prompt, e.g. "37+8*6-15"."""
        return str(self.operands[0]) + "".join(f"{op}{v}" for op, v in zip(self.operators, self.operands[1:]))

    @property
    def answer(self) -> int:
        """The exact value of the expression (standard precedence)."""
        return self.steps[-1].result

    @classmethod
    def from_expression(cls, text: str) -> Problem:
        """Parse "37+8*6-15" (surrounding blanks allowed) back into a Problem."""
        text = text.strip() if isinstance(text, str) else text
        if not isinstance(text, str) or not _EXPR_RE.fullmatch(text):
            raise ValueError(f"expected an expression like '37+8*6-15' (canonical non-negative integers joined by "
                             f"'+', '-', '*'), got {text!r}")
        tokens = re.split(r"([-+*])", text)
        return cls(tuple(int(t) for t in tokens[::2]), tuple(tokens[1::2]))


# --- problem generation ---------------------------------------------------------------------------------------
def _draw(rng: random.Random, cfg: ArithmeticConfig) -> Problem:
    ops = [rng.choice(cfg.operators) for _ in range(rng.randint(cfg.min_ops, cfg.max_ops))]
    operands = []
    for i in range(len(ops) + 1):
        next_to_mul = (i > 0 and ops[i - 1] == "*") or (i < len(ops) and ops[i] == "*")
        digits = rng.randint(cfg.min_digits, cfg.mul_max_digits if next_to_mul else cfg.max_digits)
        operands.append(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))
    return Problem(tuple(operands), tuple(ops))


def generate_problems(n: int, cfg: ArithmeticConfig = ArithmeticConfig(), seed: int = 0, *,
                      exclude: Iterable[Problem] = (), unique: bool = True) -> list[Problem]:
    """`n` problems drawn from `cfg` with a local `random.Random(seed)`: the same arguments give the same list,
    and a request for n problems is a prefix of a request for more. `unique` drops repeats; `exclude` (e.g. the
    test problems) are never returned, so held-out problems cannot leak into training data. Raises ValueError
    when the problem space cannot supply n problems (widen the config or ask for fewer)."""
    int_arg("n", n, min=0)
    if not isinstance(cfg, ArithmeticConfig):
        raise TypeError(f"cfg: expected an ArithmeticConfig, got {type(cfg).__name__}")
    seen = set(exclude)
    if not all(isinstance(p, Problem) for p in seen):
        raise TypeError("exclude: expected an iterable of Problem")
    rng, out, misses, max_misses = random.Random(seed), [], 0, max(10_000, 20 * n)
    while len(out) < n:
        p = _draw(rng, cfg)
        if p in seen or (not cfg.allow_negative and any(s.result < 0 for s in p.steps)):
            misses += 1
            if misses > max_misses:
                raise ValueError(f"generate_problems: {max_misses} draws in a row gave no new problem after "
                                 f"{len(out)} of n={n}; {cfg} has too few problems (ask for fewer, exclude "
                                 f"fewer, or widen the digit or operation range)")
            continue
        misses = 0
        out.append(p)
        if unique:
            seen.add(p)
    return out


# --- text -----------------------------------------------------------------------------------------------------
def prompt(p: Problem) -> str:
    """The question the model is conditioned on, e.g. "Q: 37+8*6-15\\n"."""
    return f"Q: {p.expression}\n"


def solution(p: Problem) -> str:
    """The reference worked solution: one step per line, the answer line, END."""
    return "".join(f"{s}\n" for s in p.steps) + f"A: {p.answer}{END}"


def sample_text(p: Problem) -> str:
    """A training sample: prompt followed by the worked solution."""
    return prompt(p) + solution(p)


# --- grading --------------------------------------------------------------------------------------------------
def _split(completion: str, p: Problem | None = None) -> tuple[list[str], str | None]:
    """(lines before the first answer line, that answer line or None), reading up to the first END."""
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected str, got {type(completion).__name__}")
    if p is not None and completion.startswith(prompt(p)):
        completion = completion[len(prompt(p)):]
    lines = completion.split(END, 1)[0].split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("A:"):
            return lines[:i], line
    return lines, None


def _answer_of(line: str | None) -> int | None:
    m = _ANSWER_RE.fullmatch(line.strip()) if line is not None else None
    return int(m.group(1)) if m else None


def parse_answer(completion: str) -> int | None:
    """The final answer: the first "A:" line before END; None when there is none or it is not one integer."""
    return _answer_of(_split(completion)[1])


def check(problem: Problem, completion: str) -> bool:
    """Exact match of the completion's final answer with the problem's."""
    return _answer_of(_split(completion, problem)[1]) == problem.answer


def check_steps(problem: Problem, completion: str) -> bool:
    """`check`, and the lines before the answer are exactly the problem's steps in the documented order, each
    with correct arithmetic (see the module docstring)."""
    body, answer_line = _split(completion, problem)
    if _answer_of(answer_line) != problem.answer or len(body) != len(problem.steps):
        return False
    for line, step in zip(body, problem.steps):
        m = _STEP_RE.fullmatch(line)
        if m is None or Step(int(m[1]), m[2], int(m[3]), int(m[4])) != step:
            return False
    return True


@dataclass(frozen=True)
class CurateStats:
    """Counts from `curate`; valid_steps <= correct <= total, and kept is valid_steps (strict) or correct."""

    total: int
    """Completions seen."""
    correct: int
    """Completions whose final answer is right (`check`)."""
    valid_steps: int
    """Completions whose every step is right too (`check_steps`)."""
    kept: int
    """Completions returned for training."""


def _pairs(problems: Sequence[Problem], completions: Sequence[str]) -> list[tuple[Problem, str]]:
    if len(problems) != len(completions):
        raise ValueError(f"expected one completion per problem, got {len(problems)} problems and "
                         f"{len(completions)} completions")
    if not all(isinstance(p, Problem) for p in problems):
        raise TypeError("problems: expected a sequence of Problem")
    return list(zip(problems, completions))


def curate(problems: Sequence[Problem], completions: Sequence[str], strict: bool = True
           ) -> tuple[list[tuple[Problem, str]], CurateStats]:
    """Keep the teacher's completions that pass `check_steps` (strict) or `check`; return (problem, cleaned
    completion) pairs in input order, and the counts. A kept completion is cut to its lines before the answer
    plus a canonical "A: <answer>" line and END, so `prompt(p) + completion` is a clean training sample."""
    kept, correct, valid = [], 0, 0
    for p, c in _pairs(problems, completions):
        ok_answer = check(p, c)
        ok_steps = ok_answer and check_steps(p, c)
        correct, valid = correct + ok_answer, valid + ok_steps
        if ok_steps or (ok_answer and not strict):
            body = _split(c, p)[0]
            kept.append((p, "".join(f"{line}\n" for line in body) + f"A: {p.answer}{END}"))
    return kept, CurateStats(total=len(completions), correct=correct, valid_steps=valid, kept=len(kept))


def exact_match(problems: Sequence[Problem], completions: Sequence[str]) -> float:
    """Fraction of completions whose final answer is right; ValueError for empty input."""
    pairs = _pairs(problems, completions)
    if not pairs:
        raise ValueError("exact_match: expected at least one problem, got none")
    return sum(check(p, c) for p, c in pairs) / len(pairs)
