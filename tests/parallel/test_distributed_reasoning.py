"""`--task arithmetic` (sequence-level distillation) on 2 gloo processes against 1 process: the same curated set
and the same losses of every stage, with the models' solution writing simulated (a rule on the problem itself, so
a rank writing its share of the problems writes what one process does).

Rows here hold one padded sample each, so rows have different target counts for the main head and for each MTP
depth: every term is divided by its own count over the step (all micro-batches, all data ranks), so the losses are
one process's to fp32 summation order, as on packed text."""
import dataclasses
import json
from pathlib import Path

import torch

from kdarch.testing import spawn_gloo
from kdarch.train import arithmetic as ar
from kdarch.train.config import RunConfig, StageSpec, TrainSection

REL = 1e-5  # fp32, another summation order than one process


def _solve_by_rule(model, problems, tok, batch=100):
    """Right on the problems whose prompt's byte sum is even, a wrong final answer on the others."""
    return [ar.solution(p) if sum(ar.prompt(p).encode()) % 2 == 0 else ar.solution(p).replace("A: ", "A: 1")
            for p in problems]


def _arithmetic(out_dir) -> dict:
    from kdarch.train import reasoning
    torch.set_num_threads(1)
    train = TrainSection(steps=3, batch_size=4, log_every=1, eval_sequences=4, progress=False, warmup_steps=1,
                         threads=1, deterministic=True)
    spec = lambda name, **f: StageSpec(name, {"preset": "debug", **f}, dataclasses.asdict(train))  # noqa: E731
    run = RunConfig(train=train, teacher=spec("teacher", hidden_size=96, n_heads=6), students=(spec("student"),))
    return reasoning.run_arithmetic(run, Path(out_dir), log=lambda *_: None)


def _worker(rank, out_dir, plan):
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    from kdarch.train import reasoning
    reasoning.solve, reasoning.N_CURATE = _solve_by_rule, 40  # this process's own module
    runtime.init_distributed(ParallelConfig(**plan))
    try:
        report = _arithmetic(out_dir)
        Path(out_dir, f"curation{rank}.json").write_text(json.dumps(report["arithmetic"]))
    finally:
        runtime.teardown()


def _losses(run_dir: Path, stage: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def test_arithmetic_task_on_two_processes_equals_one(tmp_path, monkeypatch):
    from kdarch.train import reasoning
    monkeypatch.setattr(reasoning, "solve", _solve_by_rule)
    monkeypatch.setattr(reasoning, "N_CURATE", 40)
    one = _arithmetic(tmp_path / "one")
    spawn_gloo(_worker, 2, str(tmp_path / "two"), {"dp_shard": 2, "ep": 2})
    ranks = [json.loads((tmp_path / "two" / f"curation{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] == one["arithmetic"]  # the same curated set and exact-match figures everywhere
    assert 0 < one["arithmetic"]["curation"]["kept"] < 40
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["arithmetic"]["curation"] == one["arithmetic"]["curation"]
    for stage in ("teacher", "student", "scratch"):
        a, b = _losses(tmp_path / "one", stage), _losses(tmp_path / "two", stage)
        rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
        print(f"arithmetic {stage}, dp_shard=2 x ep=2: per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
        assert len(a) == len(b) == 3 and max(rel) < REL, (stage, a, b)
