"""Sequence-level (reasoning) distillation on multi-step arithmetic: `kdarch distill --task arithmetic`.

The recipe of DeepSeek-R1's distilled models at toy scale: a teacher learns worked solutions; it then writes
solutions to problems it has never seen; a checker keeps only those whose every step and final answer are right
(curated data); the student learns from the curated solutions — here also with logit KD from the same teacher
on the same text — and is compared with the same architecture trained on as many reference solutions without a
teacher. Exact-match accuracy (greedy decoding, the final answer) on held-out problems is the measure; the
report also gives the usual held-out loss (on the test problems' reference solutions) / size / speed rows.

Text is byte-level (`ByteTokenizer`; the task is ASCII). Training rows hold one sample each, from position 0,
padded (padding is never a target): the prompt then sits where it sits at generation time, so reading the
operands back is learnt as copying from fixed offsets rather than by induction over a packed stream, which
small models pick up far sooner. Problems for teacher training, curation and testing are disjoint.

Under torchrun every rank draws the same problems, the stages train on the `[parallel]` plan as `kdarch distill`'s
do, and each finished model is whole on every rank: the solutions (the teacher's for curation, every model's for the
test problems) are written by the ranks in turns of a contiguous share each, greedily, and gathered in problem order,
so every rank curates the same set; rank 0 alone writes the tokenizer and the report.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kdarch.checks import ConfigError
from kdarch.distill.teachers import ModelTeacher
from kdarch.parallel.runtime import is_main_process
from kdarch.train import arithmetic as ar
from kdarch.train.config import DataSection, ModelSection, RunConfig, Stage, TrainSection
from kdarch.train.objective import DistillObjective, LMObjective
from kdarch.train.pipeline import Data, measure, on_policy_figures, run_stage, teacher_top1
from kdarch.train.report import write_report
from kdarch.train.tokenizer import ByteTokenizer

TASK = ar.ArithmeticConfig(max_digits=1)
"""2-3 operations on one-digit operands (intermediate results up to three digits): learnable by models of a
few million parameters within the minutes this run has on two CPU cores."""
SEQ_LEN = 64
"""Every sample fits (at most 54 bytes even with two-digit operands)."""
N_TEACHER, N_CURATE, N_TEST = 40000, 3000, 200
"""Problems the teacher learns from, problems it writes solutions for, held-out test problems."""
_SMALL = {"n_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
          "max_seq_len": 128}
DEFAULT_TEACHER = Stage("teacher", ModelSection("tiny", {**_SMALL, "hidden_size": 128, "n_layers": 3, "q_lora_rank": 48,
                                                         "kv_lora_rank": 32, "intermediate_size": 384,
                                                         "moe_intermediate_size": 64}),
                        TrainSection(steps=1200, batch_size=32, lr=5e-3, warmup_steps=30))
"""A small MoE+MLA+MTP teacher: at this scale more steps beat more width (1200 steps of 32 samples)."""
DEFAULT_STUDENT = Stage("student", ModelSection("tiny", {**_SMALL, "hidden_size": 128, "n_layers": 2, "q_lora_rank": 48,
                                                         "kv_lora_rank": 32, "intermediate_size": 384,
                                                         "moe_intermediate_size": 64}),
                        TrainSection(steps=600, batch_size=32, lr=5e-3, warmup_steps=30))
"""The student: two of the teacher's three layers, half its training steps, on the curated solutions only."""


def rows(texts: list[str], tok: ByteTokenizer) -> torch.Tensor:
    """[N, SEQ_LEN] one sample per row from position 0, right-padded with the pad id."""
    out = torch.full((len(texts), SEQ_LEN), tok.pad_id, dtype=torch.long)
    for i, ids in enumerate(tok.encode_batch(texts)):
        if len(ids) > SEQ_LEN:
            raise ValueError(f"arithmetic: a sample of {len(ids)} tokens exceeds SEQ_LEN={SEQ_LEN}: {texts[i]!r}")
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def question_lengths(tok: ByteTokenizer):
    """The prompt rule of on-policy steps: each row up to and including its question's newline."""
    newline = tok.encode("\n")[0]

    def lengths(ids_BT: torch.Tensor) -> list[int]:
        first_BT = (ids_BT == newline).int().argmax(dim=1)  # every row starts with "Q: <expression>\n"
        return (first_BT + 1).tolist()

    return lengths


@torch.no_grad()
def solve(model, problems: list[ar.Problem], tok: ByteTokenizer, batch: int = 100) -> list[str]:
    """Greedy completions of each problem's prompt, stopping at the task's END marker."""
    end_id = tok.encode(ar.END)[0]
    out = []
    for s in range(0, len(problems), batch):
        prompts = [tok.encode(ar.prompt(p)) for p in problems[s:s + batch]]
        new = model.eval().generate(prompts, SEQ_LEN - max(map(len, prompts)), eos_token_id=end_id)
        out += [tok.decode(ids) for ids in new]
    return out


def solve_shared(model, problems: list[ar.Problem], tok: ByteTokenizer) -> list[str]:
    """`solve` in one process; under torch.distributed each rank solves its contiguous share of `problems` and the
    shares are gathered on every rank, in problem order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return solve(model, problems, tok)
    n, rank = dist.get_world_size(), dist.get_rank()
    share = -(-len(problems) // n)
    shares: list = [None] * n
    dist.all_gather_object(shares, solve(model, problems[rank * share:(rank + 1) * share], tok)
                           if rank * share < len(problems) else [])
    return [text for part in shares for text in part]


def task_stages(run: RunConfig) -> tuple[Stage, Stage]:
    """The teacher and student stages of the task, every field of the run honoured or refused by name: [teacher],
    one [[students]] entry, [model] (the default student's architecture) and [train] are laid over the task's
    default stages as in `kdarch distill`; [data] and distill.teacher cannot apply (the task makes its own data
    and teacher)."""
    for f in dataclasses.fields(DataSection):
        if getattr(run.data, f.name) != getattr(DataSection(), f.name):
            raise ConfigError(f"data.{f.name}: expected no [data] settings with --task arithmetic (its problems are "
                              f"generated, byte-tokenized, {SEQ_LEN} tokens per row), got "
                              f"{getattr(run.data, f.name)!r}")
    if run.distill.teacher:
        raise ConfigError(f"distill.teacher: expected none with --task arithmetic (it trains its teacher on the task's "
                          f"worked solutions), got {run.distill.teacher!r}")
    if len(run.students) > 1:
        raise ConfigError(f"students: expected one [[students]] entry with --task arithmetic, got {len(run.students)}")
    teacher, (student,) = run.stages(DEFAULT_TEACHER, DEFAULT_STUDENT)
    return teacher, student


def run_arithmetic(run: RunConfig, out: Path, *, resume: bool = False, log=print) -> dict:
    t_start = time.perf_counter()
    teacher_stage, student_stage = task_stages(run)
    cfg, tok = TASK, ByteTokenizer()
    if is_main_process():
        tok.save(out / "tokenizer")
    # Test and curation problems are drawn before the teacher's (unique) training problems, which exhaust the
    # small space of two-operation problems: drawn after them, the curation set would hold almost only
    # three-operation problems and the student would never see a two-step solution.
    test = ar.generate_problems(N_TEST, cfg, seed=1)
    fresh = ar.generate_problems(N_CURATE, cfg, seed=3, exclude=test)
    learn = ar.generate_problems(N_TEACHER, cfg, seed=2, exclude=test + fresh)
    heldout_NT = rows([ar.sample_text(p) for p in test], tok)
    teacher_data = Data(tok, rows([ar.sample_text(p) for p in learn], tok), heldout_NT, SEQ_LEN, tok.pad_id)
    lm = lambda model: LMObjective(pad_id=tok.pad_id)  # noqa: E731 (one objective per stage)
    end_id = tok.encode(ar.END)[0]
    log(f"arithmetic: {len(learn)} problems with reference solutions for the teacher, {len(fresh)} new problems for "
        f"it to solve, {len(test)} held-out test problems ({ar.sample_text(test[0])!r} ...)")

    teacher_run = run_stage(teacher_stage, teacher_data, out, objective_for=lm, resume=resume, log=log)
    t0 = time.perf_counter()
    written = solve_shared(teacher_run.model, fresh, tok)
    kept, stats = ar.curate(fresh, written, strict=True)
    log(f"teacher wrote {len(written)} solutions in {time.perf_counter() - t0:.0f}s; kept {stats.kept} "
        f"(right answer {stats.correct}, valid steps {stats.valid_steps})")
    if not kept:
        raise RuntimeError("arithmetic: the teacher solved none of the curation problems; train it longer "
                           "([teacher] train.steps)")
    curated = [ar.prompt(p) + completion for p, completion in kept]
    student_data = dataclasses.replace(teacher_data, train_NT=rows(curated, tok))
    # The scratch student learns from as many reference solutions (of other problems) as the student got.
    scratch_data = dataclasses.replace(teacher_data, train_NT=rows([ar.sample_text(p) for p in learn[:len(kept)]],
                                                                   tok))
    teacher = ModelTeacher(teacher_run.model, name=teacher_stage.name, fingerprint=tok.fingerprint)
    teacher.align_to(tok.vocab_size, student_fingerprint=tok.fingerprint)
    objectives: list[DistillObjective] = []

    def distill_objective(m):  # on-policy rollouts answer each row's question, ending at END
        objectives.append(DistillObjective(teacher, m, run.distill, student_stage.train.steps, pad_id=tok.pad_id,
                                           prompt_lengths=question_lengths(tok), eos_token_id=end_id,
                                           seed=student_stage.train.seed))
        return objectives[-1]

    student_run = run_stage(student_stage, student_data, out, resume=resume, teacher=teacher.name, log=log,
                            objective_for=distill_objective)
    runs = {"teacher": teacher_run, "student": student_run}
    if run.scratch:
        runs["scratch"] = run_stage(dataclasses.replace(student_stage, name="scratch"), scratch_data, out,
                                    objective_for=lm, resume=resume, log=log)

    top1_NT = teacher_top1(teacher, heldout_NT, 0)
    report: dict = {"task": "arithmetic", "teacher": {"source": f"trained here ({teacher_stage.train.steps} steps)"},
                    "student": on_policy_figures(run.distill, objectives),
                    "arithmetic": {"curation": dataclasses.asdict(stats),
                                                         "test_problems": len(test)}}
    for key, res in runs.items():
        report[key] = {**report.get(key, {}), **measure(res, teacher_data, eval_sequences=0, teacher_top1_NT=top1_NT,
                                                               speculative=key != "teacher")}
        completions = solve_shared(res.model, test, tok)
        report["arithmetic"][key] = {"exact_match": ar.exact_match(test, completions),
                                     "example": ar.prompt(test[0]) + completions[0]}
        log(f"[{key}] exact match on {len(test)} test problems: {report['arithmetic'][key]['exact_match']:.1%}")
    report["wall_seconds"] = time.perf_counter() - t_start
    if is_main_process():
        write_report(out, report, {key: res.rows for key, res in runs.items()},
                     run.to_toml(teacher_stage, [student_stage]))
    return report
