"""`kdarch plan`'s memory against what real runs allocate: the parameters and AdamW state one device holds after
a training step, in 1 process and on 2 gloo processes (FSDP2 dp_shard=2, and dp_shard=2 with ep=2), summed over
each rank's local shards, are the plan's per-device figures within 10% (the plan is closed-form arithmetic over
the config's shapes; the run counts the tensors it actually made)."""
import json
import math
from pathlib import Path

import torch

from kdarch.config import get_preset
from kdarch.model import CausalLM
from kdarch.parallel.cluster import Cluster
from kdarch.parallel.config import ParallelConfig
from kdarch.parallel.plan import Plan, estimate
from kdarch.testing import spawn_gloo

CFG = get_preset("debug", n_layers=4)  # layers 1-3 MoE (8 experts), one MTP module
LAYOUTS = [{"dp_shard": 2}, {"dp_shard": 2, "ep": 2}]


def _local_bytes(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _one_step(model: torch.nn.Module) -> dict[str, int]:
    """One forward, backward and AdamW step of `model` (a plain or a parallelised CausalLM); the bytes of this
    process's parameters and optimizer state (moments; the step counters are scalars)."""
    from kdarch.train.config import TrainSection
    from kdarch.train.loop import build_optimizer
    opt, _ = build_optimizer(list(model.named_parameters()), TrainSection(steps=1, warmup_steps=1))
    torch.manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    params = {id(p): p for p in model.parameters()}.values()
    optim = [t for st in opt.state.values() for k, t in st.items() if k != "step"]
    return {"params": sum(_local_bytes(p) for p in params), "optimizer": sum(_local_bytes(t) for t in optim)}


def _plan(**layout):
    parallel = ParallelConfig(**layout)
    plan = Plan.from_parallel(parallel, seq_len=16, pp_microbatches=1, param_dtype="fp32", grad_dtype="fp32",
                              optim_dtype="fp32", master_weights=False)
    return estimate(CFG, Cluster(gpus=parallel.world_size, gpu_memory_gib=80.0), plan).memory


def _worker(rank, out_dir):
    from kdarch.parallel import runtime
    from kdarch.parallel.parallelize import parallelize
    out = []
    for layout in LAYOUTS:
        ctx = runtime.init_distributed(ParallelConfig(**layout), CFG)
        try:
            torch.manual_seed(0)
            out.append(_one_step(parallelize(CausalLM(CFG), ctx)))
        finally:
            runtime.teardown()
    Path(out_dir, f"bytes{rank}.json").write_text(json.dumps(out))


def test_plan_memory_matches_one_and_two_process_runs(tmp_path):
    torch.manual_seed(0)
    measured = {"1 process": _one_step(CausalLM(CFG))}
    spawn_gloo(_worker, 2, str(tmp_path))
    ranks = [json.loads((tmp_path / f"bytes{r}.json").read_text()) for r in range(2)]
    for i, layout in enumerate(LAYOUTS):  # the plan's figures are the fullest device's
        measured[str(layout)] = max((r[i] for r in ranks), key=lambda b: b["params"] + b["optimizer"])
    one = measured["1 process"]
    for name, real in measured.items():
        m = _plan(**({} if name == "1 process" else LAYOUTS[[str(x) for x in LAYOUTS].index(name)]))
        print(f"{name}: plan {m.params + m.optimizer:.0f} B, measured {real['params'] + real['optimizer']} B")
        assert math.isclose(m.params, real["params"], rel_tol=0.10), (name, m.params, real)
        assert math.isclose(m.optimizer, real["optimizer"], rel_tol=0.10), (name, m.optimizer, real)
        if name != "1 process":  # sharding really divided the state the run holds
            assert real["params"] < 0.6 * one["params"], (name, real, one)
