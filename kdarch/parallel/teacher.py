"""A distillation teacher on a parallel plan: whole on every data rank, or sharded over them with FSDP2.

Every data rank runs the teacher on its own rows of the global batch (the rows its student replica trains on),
so each row's teacher signal is the one a single process computes. Two ways to hold it:
- replicated (the default): each rank keeps the whole teacher and runs it locally, no communication;
- sharded (`distill.teacher_shard = true`, a teacher bigger than one device): FSDP2 `fully_shard` per block and
  the root over all data ranks (dp_replicate x dp_shard flattened), `reshard_after_forward=True`: a rank keeps
  1 / dp of the weights and gathers one block at a time for its forward, freeing it behind. The teacher runs
  under `torch.no_grad()` (`Teacher.__call__`), so nothing is kept for a backward, and it has no optimizer.
  Its gathers are collectives: every data rank calls it the same number of times per step, which the train
  loop guarantees (the same micro-batches everywhere, the same number of rows each).

A block is an element of the outermost `nn.ModuleList`s of the model (a kdarch model's `layers` and `mtp`, a
Hugging Face causal LM's `model.layers`), so any architecture shards without knowing its class. A logit cache
has no weights: each data rank looks up its own rows' entries (`CachedTeacher(ids, indices)` with the rank's
sequence indices), reading only the shards that hold them.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from kdarch.checks import ConfigError
from kdarch.parallel.runtime import DistributedContext

__all__ = ["shard_teacher", "teacher_model"]


def teacher_model(teacher) -> nn.Module | None:
    """The module behind a teacher (a ModelTeacher's model, a cross-tokenizer teacher's inner one), or None for
    one without weights (a logit cache)."""
    inner = getattr(teacher, "inner", teacher)
    model = getattr(inner, "model", None)
    return model if isinstance(model, nn.Module) else None


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ModuleLists under `module` (not descending into them)."""
    out = []
    for child in module.children():
        out.extend(child if isinstance(child, nn.ModuleList) else _blocks(child))
    return out


def shard_teacher(teacher, ctx: DistributedContext) -> nn.Module:
    """Shard the teacher's model in place over the data ranks of `ctx` (see the module docstring); returns it.
    A teacher already sharded is left as it is."""
    model = teacher_model(teacher)
    if model is None:
        raise ConfigError(f"distill.teacher_shard: expected false for a {type(teacher).__name__} (it holds no "
                          f"weights to shard; each data rank reads its own rows), got true")
    if ctx.config.pp > 1:
        raise ConfigError(f"distill.teacher_shard: expected false with parallel.pp={ctx.config.pp}, got true")
    if isinstance(model, FSDPModule) or ctx.dp_size == 1:
        return model
    mesh = ctx.submesh("dp")
    for block in _blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model.eval()
