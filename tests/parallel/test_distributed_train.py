"""The train loop on 2 gloo processes against the same run in 1 process: FSDP2 (dp_shard=2) and FSDP2 + expert
parallelism (ep=2) give the 1-process losses step by step, the same router biases and weights; a sharded
checkpoint resumes in 1 process on the same loss curve; a rank that dies makes the other fail, not hang, and
leaves no complete checkpoint of that step."""
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch

from kdarch.config import get_preset
from kdarch.model import CausalLM
from kdarch.testing import spawn_gloo
from kdarch.train.checkpoint import complete_checkpoints
from kdarch.train.config import TrainSection

CFG = get_preset("debug", n_layers=4, bias_update_speed=0.01)  # layers 1-3 MoE (8 experts), one MTP module
STEPS = 4
REL = 1e-4  # fp32, another summation order than one process


def _data() -> torch.Tensor:
    from kdarch.train.data import embedded_corpus
    raw = "\n\n".join(embedded_corpus()).encode()[:64 * 32]
    return torch.tensor(list(raw), dtype=torch.long).view(64, 32)  # byte tokens: real text, 64 rows of 32


def _cfg(**kw) -> TrainSection:
    return TrainSection(**{"steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1,
                           "log_every": 1, "checkpoint_every": STEPS, "keep_last": 4, "progress": False,
                           "deterministic": True, "threads": 1, "device": "cpu", **kw})


def _model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(CFG)


PAD = 0  # never a byte of the text


def _padded_data() -> torch.Tensor:
    """_data's rows cut to 4..31 tokens and padded: every row has its own number of targets for each head."""
    ids = _data()
    keep = 4 + (torch.arange(ids.shape[0]) * 11) % 28
    return ids.masked_fill(torch.arange(ids.shape[1]) >= keep[:, None], PAD)


def _run(run_dir, *, resume=False, evaluate=None, distill=False, padded=False, eos_token_id=None, objectives=None,
         **kw):
    from kdarch.train.loop import train
    from kdarch.train.objective import LMObjective
    model = _model()
    objective = _distill_objective(model, eos_token_id, **({} if distill is True else distill)) if distill else \
        LMObjective(pad_id=PAD) if padded else None
    res = train(model, _cfg(**kw), _padded_data() if padded else _data(), run_dir, resume=resume, evaluate=evaluate,
                objective=objective, **({"name": "t"} if evaluate else {}))
    if objectives is not None:
        objectives.append(objective)
    return model, res.rows


def _distill_objective(student, eos_token_id=None, **distill):
    """Distillation from a small kdarch teacher (another debug model), the default [distill] losses."""
    from kdarch.distill.teachers import ModelTeacher
    from kdarch.train.config import DistillSection
    from kdarch.train.objective import DistillObjective
    torch.manual_seed(1)
    teacher = ModelTeacher(CausalLM(get_preset("debug")).eval())
    return DistillObjective(teacher, student, DistillSection(**distill), total_steps=STEPS, eos_token_id=eos_token_id)


def _save(out_dir, rank, model, rows):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              os.path.join(out_dir, f"weights{rank}.safetensors"))
    Path(out_dir, f"rows{rank}.json").write_text(json.dumps(rows))


def _worker(rank, out_dir, plan, kw):
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    runtime.init_distributed(ParallelConfig(**plan), CFG)
    try:
        model, rows = _run(Path(out_dir) / "run", **kw)
        _save(out_dir, rank, model, rows)
    finally:
        runtime.teardown()


class _Stop(Exception):
    pass


def _stop_at_3():
    raise _Stop()


def _worker_stopped(rank, out_dir, plan):
    """Trains to step 2 (checkpoint), then every rank stops inside step 3: a run killed after a checkpoint."""
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    runtime.init_distributed(ParallelConfig(**plan), CFG)
    try:
        _run(Path(out_dir) / "run", checkpoint_every=2, eval_every=3, evaluate=_stop_at_3)
    except _Stop:
        pass
    finally:
        runtime.teardown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-process run: the independent reference of every test here."""
    model, rows = _run(tmp_path_factory.mktemp("ref"))
    return model, rows


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _check_same_run(tmp_path, reference, ep: int):
    ref_model, ref_rows = reference
    rows = [json.loads((tmp_path / f"rows{r}.json").read_text()) for r in range(2)]
    timeless = [[{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rs] for rs in rows]
    assert timeless[0] == timeless[1]  # every rank logged the same (global) values
    assert [r["step"] for r in rows[0]] == list(range(1, STEPS + 1))
    rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows[0], ref_rows)]
    print(f"ep={ep}: per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
    assert max(rel) < REL, rel
    for key in ("lm_loss", "mtp_loss", "grad_norm", "expert_load_max_over_mean"):
        assert max(_rel(a[key], b[key]) for a, b in zip(rows[0], ref_rows)) < REL, key
    assert rows[0][-1]["tokens"] == ref_rows[-1]["tokens"] == STEPS * 2 * 4 * 32  # the global batch's tokens
    assert ref_rows[-1]["loss"] < ref_rows[0]["loss"]  # the reference really trains
    from safetensors.torch import load_file
    ref_sd = ref_model.state_dict()
    for r in range(2):  # each rank's own model got the gathered weights: whole experts, the 1-process values
        sd = load_file(str(tmp_path / f"weights{r}.safetensors"))
        for k, v in sd.items():
            torch.testing.assert_close(v, ref_sd[k], rtol=1e-4, atol=2e-5, msg=k)
    biases = [k for k in ref_sd if k.endswith("gate.bias")]
    assert biases and all(ref_sd[k].abs().sum() > 0 for k in biases)  # the bias update did move them
    for k in biases:  # global load: the same sign-steps as one process, on both ranks
        torch.testing.assert_close(load_file(str(tmp_path / "weights1.safetensors"))[k], ref_sd[k], rtol=0, atol=1e-7)
    return rows[0]


def test_fsdp2_dp_shard2_equals_one_process(tmp_path, reference):
    spawn_gloo(_worker, 2, str(tmp_path), {"dp_shard": 2}, {})
    rows = _check_same_run(tmp_path, reference, ep=1)
    assert "ep_bytes_sent" not in rows[0]
    ckpts = complete_checkpoints(tmp_path / "run")
    assert [s for s, _ in ckpts] == [STEPS]  # rank 0 wrote the final checkpoint, complete


def test_fsdp2_with_ep2_equals_one_process(tmp_path, reference):
    spawn_gloo(_worker, 2, str(tmp_path), {"dp_shard": 2, "ep": 2}, {})
    rows = _check_same_run(tmp_path, reference, ep=2)
    # token copies crossed between the ranks every step: fp32 rows of the model width, dispatch and combine
    assert all(r["ep_bytes_sent"] > 0 and r["ep_bytes_sent"] % (4 * CFG.hidden_size) == 0 for r in rows)


PP2_DUALPIPEV = {"pp": 2, "pp_schedule": "DualPipeV", "pp_microbatches": 4}


def test_four_ranks_dualpipev_pp2_beside_dp_replicate2(tmp_path, reference):
    """pp=2 (DualPipeV) x dp_replicate=2: each replica's pipeline runs its rows, gradients summed over replicas.
    One micro-batch of 8 rows per step (2 per replica and micro-batch): the same rows and tokens per step as the
    reference's 2 of 4."""
    spawn_gloo(_worker, 4, str(tmp_path), {**PP2_DUALPIPEV, "dp_replicate": 2, "pp_microbatches": 4},
               {"batch_size": 8, "grad_accum": 1})
    _check_same_run(tmp_path, reference, ep="1, pp=2 DualPipeV x dp_replicate=2")


def test_four_ranks_experts_sharded_over_dp_shard_out(tmp_path, reference):
    """dp_shard=4, ep=2: each expert slice is FSDP-sharded over the 2 ranks of dp_shard_out (4 processes, the only
    test here beyond 2: slower on 2 cores, but the one layout where the experts are sharded by both)."""
    spawn_gloo(_worker, 4, str(tmp_path), {"dp_shard": 4, "ep": 2}, {})
    _check_same_run(tmp_path, reference, ep="2, dp_shard=4")


@pytest.mark.parametrize("plan", [{"dp_shard": 2, "ep": 2}, PP2_DUALPIPEV], ids=["ep2", "pp2"])
def test_sharded_checkpoint_resumes_in_one_process(tmp_path, reference, plan):
    _, ref_rows = reference
    spawn_gloo(_worker_stopped, 2, str(tmp_path), plan)
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [2]
    from kdarch.train.checkpoint import load_checkpoint
    from kdarch.train.loop import build_optimizer
    plain = _model()
    opt, _ = build_optimizer(list(plain.named_parameters()), _cfg())
    load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002", model=plain, optimizer=opt)
    assert plain.layers[1].ffn.w_gate_up.shape[0] == CFG.n_routed_experts  # whole experts in the file
    model, rows = _run(tmp_path / "run", resume=True, checkpoint_every=2)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows, ref_rows)]
    print(f"resume 2 ({plan}) -> 1 process: per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
    assert max(rel) < REL, rel


def test_distillation_with_ep2_equals_one_process(tmp_path):
    """Logit KD plus feature KD: its projector trains whole on every rank, gradients summed, saved once."""
    distill = {"feature_weight": 0.5}
    _, ref_rows = _run(tmp_path / "ref", distill=distill)
    spawn_gloo(_worker, 2, str(tmp_path), {"dp_shard": 2, "ep": 2}, {"distill": distill})
    from kdarch.train.checkpoint import CHECKPOINTS
    from kdarch.train.checkpoint import load_checkpoint as load
    from kdarch.train.loop import build_optimizer
    saved = {}
    for run in ("ref", "run"):  # the projector's weights and AdamW moments after the run, as each checkpoint has them
        student, (ckpt,) = _model(), list((tmp_path / run / CHECKPOINTS).iterdir())
        objective = _distill_objective(student, **distill)
        opt, _ = build_optimizer(list(student.named_parameters()) + [
            (f"features.{n}", q) for n, q in objective.modules["features"].named_parameters()], _cfg())
        load(ckpt, model=student, optimizer=opt, modules=objective.modules)
        proj = list(objective.modules["features"].parameters())
        saved[run] = [q.detach().clone() for q in proj] + [opt.state[q]["exp_avg"] for q in proj]
    for a, b in zip(saved["run"], saved["ref"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    rows = json.loads((tmp_path / "rows0.json").read_text())
    assert len(rows) == len(ref_rows) == STEPS
    assert set(rows[0]) == set(ref_rows[0]) | {"ep_bytes_sent"}
    rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows, ref_rows)]
    print(f"distillation, ep=2: per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
    for key in sorted(set(ref_rows[0]) - {"tokens_per_s"}):  # every distillation metric, summed over the ranks
        assert max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-6) for a, b in zip(rows, ref_rows)) < REL, key
    assert ref_rows[-1]["loss"] < ref_rows[0]["loss"]


@pytest.mark.parametrize("plan", [{"dp_shard": 2}, {"dp_shard": 2, "ep": 2}])
def test_on_policy_distillation_equals_one_process(tmp_path, plan):
    """λ = 0.5: steps 2 and 4 distil on the student's own samples, each data rank sampling its rows of the batch
    through the FSDP-sharded (and expert-parallel) student; every row is seeded by the step and its index, so the
    samples, and so the losses, are those of one process."""
    distill = {"on_policy": 0.5, "rollout_tokens": 6, "rollout_temperature": 1.0}
    _, ref_rows = _run(tmp_path / "ref", distill=distill)
    spawn_gloo(_worker, 2, str(tmp_path), plan, {"distill": distill})
    rows = [json.loads((tmp_path / f"rows{r}.json").read_text()) for r in range(2)]
    assert [r["on_policy"] for r in rows[0]] == [r["on_policy"] for r in ref_rows] == [0.0, 1.0, 0.0, 1.0]
    rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows[0], ref_rows)]
    print(f"on-policy distillation, {plan}: per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
    assert len(rel) == STEPS and max(rel) < REL, rel
    for key in ("kd_loss", "soft", "grad_norm"):
        assert max(_rel(a[key], b[key]) for a, b in zip(rows[0], ref_rows)) < REL, key
    assert [r["loss"] for r in rows[1]] == [r["loss"] for r in rows[0]]  # every rank logged the global values


STRICT = 1e-5  # a step's terms each normalised by their global counts: only the summation order differs


@pytest.fixture(scope="module")
def padded_reference(tmp_path_factory):
    """1 process on padded rows (MTP on): 2 micro-batches of 4 rows per step, checked against one batch of 8."""
    _, rows = _run(tmp_path_factory.mktemp("padded_ref"), padded=True)
    _, whole = _run(tmp_path_factory.mktemp("padded_whole"), padded=True, batch_size=8, grad_accum=1)
    for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
        assert max(_rel(a[key], b[key]) for a, b in zip(rows, whole)) < STRICT, key
    return rows


@pytest.mark.parametrize("plan", [{"dp_shard": 2}, {"dp_shard": 2, "ep": 2}, {"pp": 2, "pp_microbatches": 2}],
                         ids=["dp_shard2", "ep2", "pp2"])
def test_rows_with_different_target_counts_give_the_one_process_losses(tmp_path, padded_reference, plan):
    """Rows padded to 4..31 tokens: each rank's main-head and MTP targets differ in number from its share of the
    rows, so every term must be divided by its own count over the whole step, not weighted by the main head's."""
    spawn_gloo(_worker, 2, str(tmp_path), plan, {"padded": True})
    rows = json.loads((tmp_path / "rows0.json").read_text())
    assert len(rows) == len(padded_reference) == STEPS
    for key in ("loss", "lm_loss", "mtp_loss", "grad_norm"):
        rel = [_rel(a[key], b[key]) for a, b in zip(rows, padded_reference)]
        print(f"padded rows, {plan}: per-step {key} relative differences {[f'{x:.1e}' for x in rel]}")
        assert max(rel) < STRICT, (key, rel)
    assert padded_reference[-1]["loss"] < padded_reference[0]["loss"]


EOS = 150  # a byte the young student (its samples near uniform) draws in a few of these rollouts: they end early


@pytest.mark.parametrize("plan", [{"dp_shard": 2}], ids=["dp_shard2"])
def test_on_policy_rollouts_that_end_early_give_the_one_process_losses(tmp_path, plan):
    """Rollouts cut at their end token: the sampled rows have different target counts, so the on-policy loss must
    be divided by the step's sampled tokens over every micro-batch and data rank."""
    distill = {"on_policy": 0.5, "rollout_tokens": 12, "rollout_temperature": 1.0}
    objectives = []
    _, ref_rows = _run(tmp_path / "ref", distill=distill, eos_token_id=EOS, objectives=objectives)
    stats = objectives[0].rollouts
    assert stats.sequences == 2 * 8 and 2 * 8 < stats.tokens < 2 * 8 * 12  # some rows ended early, not every one
    spawn_gloo(_worker, 2, str(tmp_path), plan, {"distill": distill, "eos_token_id": EOS})
    rows = json.loads((tmp_path / "rows0.json").read_text())
    assert [r["on_policy"] for r in rows] == [r["on_policy"] for r in ref_rows] == [0.0, 1.0, 0.0, 1.0]
    for key in ("loss", "kd_loss", "soft", "mtp_kd_loss", "grad_norm"):
        rel = [_rel(a[key], b[key]) for a, b in zip(rows, ref_rows)]
        print(f"on-policy, early ends, {plan}: per-step {key} relative differences {[f'{x:.1e}' for x in rel]}")
        assert max(rel) < STRICT, (key, rel)


def test_one_process_checkpoint_resumes_on_two_with_ep2(tmp_path, reference):
    _, ref_rows = reference
    with pytest.raises(_Stop):  # the 1-process run killed in step 3, after its step-2 checkpoint
        _run(tmp_path / "run", checkpoint_every=2, eval_every=3, evaluate=_stop_at_3)
    spawn_gloo(_worker, 2, str(tmp_path), {"dp_shard": 2, "ep": 2}, {"resume": True, "checkpoint_every": 2})
    rows = json.loads((tmp_path / "rows0.json").read_text())
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows, ref_rows)]
    print(f"resume 1 -> 2 processes (ep=2): per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
    assert max(rel) < REL, rel
    assert "ep_bytes_sent" in rows[2] and "ep_bytes_sent" not in rows[1]  # steps 3-4 ran on the plan


def test_hsdp_dp_replicate2_equals_one_process(tmp_path, reference):
    spawn_gloo(_worker, 2, str(tmp_path), {"dp_replicate": 2}, {})
    _check_same_run(tmp_path, reference, ep=1)


REFUSALS = [  # (plan, run, the ConfigError each rank must raise before any work)
    ({"pp": 2, "pp_microbatches": 2}, {"distill": {"relation_weight": 0.5}},
     "distill.relation_weight: expected 0 with parallel.pp=2 (the last pipeline stage sees only the final hidden "
     "states), got 0.5"),
    ({"pp": 2, "pp_microbatches": 2}, {"distill": {"on_policy": 1.0}},
     "distill.on_policy: expected 0 with parallel.pp=2 (the student's rollouts need the whole model on one rank)"),
    ({"dp_shard": 2}, {"batch_size": 3}, "train.batch_size: expected a multiple of the data-parallel ranks "
     "dp_replicate * dp_shard = 2 (the global batch is split among them), got 3"),
]


def _worker_refusals(rank, out_dir):
    from kdarch.checks import ConfigError
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    for i, (plan, kw, _) in enumerate(REFUSALS):
        runtime.init_distributed(ParallelConfig(**plan), CFG)
        try:
            _run(Path(out_dir) / f"run{i}", **kw)
            msg = "no error"
        except ConfigError as e:
            msg = str(e)
        finally:
            runtime.teardown()
        Path(out_dir, f"refusal{rank}.{i}.txt").write_text(msg)


def test_plans_the_loop_cannot_run_are_refused_naming_the_field(tmp_path):
    spawn_gloo(_worker_refusals, 2, str(tmp_path))
    for i, (_, _, expected) in enumerate(REFUSALS):
        for rank in range(2):
            got = (tmp_path / f"refusal{rank}.{i}.txt").read_text()
            assert got.startswith(expected), got


@pytest.mark.parametrize("schedule,microbatches", [("DualPipeV", 4), ("1F1B", 2), ("Interleaved1F1B", 2)])
def test_pipeline_pp2_equals_one_process(tmp_path, reference, schedule, microbatches):
    """pp=2: DualPipeV (4 stages in a V: embedding, head and MTP on rank 0; ZBVZeroBubble places its stages the
    same way), 1F1B and Interleaved1F1B (the last stage, with the MTP's use of the embedding, on rank 1: its gradient
    summed over the ranks)."""
    spawn_gloo(_worker, 2, str(tmp_path), {"pp": 2, "pp_schedule": schedule, "pp_microbatches": microbatches}, {})
    _check_same_run(tmp_path, reference, ep=f"1, pp=2 {schedule}")


def _worker_counting_teacher(rank, out_dir, plan, kw):
    """_worker, counting the teacher's forward passes on this rank."""
    from kdarch.distill.teachers import Teacher
    calls, call = [], Teacher.__call__

    def counted(self, *a, **k):
        calls.append(1)
        return call(self, *a, **k)
    Teacher.__call__ = counted
    _worker(rank, out_dir, plan, kw)
    Path(out_dir, f"teacher_calls{rank}.txt").write_text(str(len(calls)))


@pytest.mark.parametrize("schedule,microbatches,distill,last",
                         [("DualPipeV", 4, True, 0), ("1F1B", 2, {"top_k": 8}, 1)], ids=["DualPipeV", "1F1B-top8"])
def test_distillation_under_pp2_equals_one_process(tmp_path, schedule, microbatches, distill, last):
    """The teacher runs on the rank of the last stage alone (rank 1 under 1F1B, rank 0 in DualPipeV's V), once per
    micro-batch of the step; its signal (dense logits, or their top-k) for the main head and the MTP depth
    (distill.mtp) meets the student's hidden states in the schedule's loss."""
    ref_model, ref_rows = _run(tmp_path / "ref", distill=distill)
    spawn_gloo(_worker_counting_teacher, 2, str(tmp_path),
               {"pp": 2, "pp_schedule": schedule, "pp_microbatches": microbatches}, {"distill": distill})
    calls = [int((tmp_path / f"teacher_calls{r}.txt").read_text()) for r in range(2)]
    assert calls[last] == STEPS * 2 and calls[1 - last] == 0, calls  # grad_accum = 2 micro-batches a step
    from safetensors.torch import load_file
    ref_sd = ref_model.state_dict()
    for k, v in load_file(str(tmp_path / "weights0.safetensors")).items():  # the gathered stages' weights
        torch.testing.assert_close(v, ref_sd[k], rtol=1e-4, atol=2e-5, msg=k)
    rows = [json.loads((tmp_path / f"rows{r}.json").read_text()) for r in range(2)]
    assert [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows[0]] == \
        [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows[1]]
    assert set(rows[0][0]) == set(ref_rows[0]) and "mtp_kd_loss" in ref_rows[0]
    rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows[0], ref_rows)]
    print(f"distillation, pp=2 {schedule}: per-step loss relative differences {[f'{x:.1e}' for x in rel]}")
    for key in sorted(set(ref_rows[0]) - {"tokens_per_s"}):
        assert max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-6) for a, b in zip(rows[0], ref_rows)) < REL, key
    assert ref_rows[-1]["loss"] < ref_rows[0]["loss"]


def test_distillation_under_dualpipev_pp2_beside_dp_replicate2(tmp_path):
    """4 processes: each replica's last-stage rank (pp rank 0 in the V) runs the teacher on its replica's rows."""
    ref_model, ref_rows = _run(tmp_path / "ref", distill=True)
    spawn_gloo(_worker_counting_teacher, 4, str(tmp_path), {**PP2_DUALPIPEV, "dp_replicate": 2},
               {"distill": True, "batch_size": 8, "grad_accum": 1})
    calls = [int((tmp_path / f"teacher_calls{r}.txt").read_text()) for r in range(4)]
    assert calls == [STEPS, STEPS, 0, 0], calls  # pp is the outer mesh dim: ranks 0, 1 are pp rank 0 of each replica
    rows = json.loads((tmp_path / "rows0.json").read_text())
    rel = [_rel(a["loss"], b["loss"]) for a, b in zip(rows, ref_rows)]
    print(f"distillation, pp=2 DualPipeV x dp_replicate=2: per-step loss relative differences "
          f"{[f'{x:.1e}' for x in rel]}")
    for key in sorted(set(ref_rows[0]) - {"tokens_per_s"}):
        assert max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-6) for a, b in zip(rows, ref_rows)) < REL, key


def _sigterm_self_on_rank1():
    import signal

    import torch.distributed as dist
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # as if only this rank had been told to stop
    return {}


def _worker_signalled(rank, out_dir, plan):
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    from kdarch.train.interrupt import Interrupted
    runtime.init_distributed(ParallelConfig(**plan), CFG)
    try:
        _run(Path(out_dir) / "run", eval_every=2, evaluate=_sigterm_self_on_rank1)
    except Interrupted as e:
        Path(out_dir, f"interrupted{rank}.json").write_text(json.dumps([e.step, e.checkpoint.name, e.exit_code]))
    finally:
        runtime.teardown()


def test_a_signal_to_one_rank_stops_every_rank_at_one_step(tmp_path, reference):
    _, ref_rows = reference
    spawn_gloo(_worker_signalled, 2, str(tmp_path), {"dp_shard": 2, "ep": 2})
    # signalled during step 2's logging: the ranks agree at step 3's reduction, save step 3 and stop there
    got = [json.loads((tmp_path / f"interrupted{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1] == [3, "step_00000003", 143]
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [3]
    _, rows = _run(tmp_path / "run", resume=True)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert max(_rel(a["loss"], b["loss"]) for a, b in zip(rows, ref_rows)) < REL


# --- a rank dies -------------------------------------------------------------------------------------------
def _failing_rank(rank, port, out_dir, timeout_s, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    from kdarch.parallel import runtime
    from kdarch.parallel.config import ParallelConfig
    from kdarch.parallel.training import ParallelStage
    if rank == 1:  # dies (or hangs) at step 3's checkpoint: after the state was gathered, before the commit barrier
        calls, barrier = [], ParallelStage.barrier

        def failing_barrier(self):
            calls.append(1)
            if len(calls) == 3:
                if mode == "dies":
                    os._exit(7)
                time.sleep(600)  # hangs: alive, silent
            barrier(self)
        ParallelStage.barrier = failing_barrier
    runtime.init_distributed(ParallelConfig(dp_shard=2, timeout_s=timeout_s), CFG)
    try:
        _run(Path(out_dir) / "run", checkpoint_every=1)
    except Exception as e:
        Path(out_dir, f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        os._exit(1)
    os._exit(0)


@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_a_failed_rank_fails_the_run_without_a_complete_checkpoint(tmp_path, mode):
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_failing_rank, args=(r, port, str(tmp_path), 10.0, mode)) for r in range(2)]
    for p in procs:
        p.start()
    procs[0].join(timeout=240)
    rank0_done = not procs[0].is_alive()
    procs[1].join(timeout=1 if mode == "hangs" else 60)
    rank1_alive = procs[1].is_alive()
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert rank0_done, "rank 0 hung instead of failing"
    assert procs[0].exitcode == 1
    assert rank1_alive if mode == "hangs" else procs[1].exitcode == 7
    error = (tmp_path / "error0.txt").read_text()
    assert error.startswith("TrainingError: train: rank 0 of 2 stopped at step 3: a collective with the other "
                            "ranks failed"), error
    if mode == "hangs":  # the monitored barrier names the rank that did not arrive within parallel.timeout_s
        assert "Ranks 1 failed to pass monitoredBarrier in 10000 ms" in error, error
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [1, 2]  # step 3 never looked complete
    assert not any(d.name.startswith(".") for d in (tmp_path / "run" / "checkpoints").iterdir())
