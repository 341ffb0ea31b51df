"""ParallelConfig: field checks, validation against world size and model (one-line messages), mesh shape."""
import dataclasses
import os

import pytest
import torch

from kdarch.checks import ConfigError
from kdarch.config import get_preset
from kdarch.parallel.config import MESH_DIMS, ParallelConfig
from kdarch.testing import spawn_gloo

TINY = get_preset("tiny")  # 16 routed experts, 4 layers, 4 heads


@pytest.mark.parametrize("kwargs,world,msg", [
    (dict(dp_shard=3, ep=3), 3, "parallel.ep: expected a divisor of n_routed_experts=16, got 3"),
    (dict(dp_shard=4), 2, "parallel.dp_replicate: expected pp*dp_replicate*dp_shard*tp == world size 2"),
    (dict(pp=3, pp_microbatches=3), 3, "parallel.pp: expected n_layers=4 divisible into pp*1 stages (1F1B), got 3"),
    (dict(pp=4, pp_schedule="DualPipeV", pp_microbatches=4), 4,
     "parallel.pp: expected n_layers=4 divisible into pp*2 stages (DualPipeV), got 4"),
    (dict(pp=2, pp_microbatches=1), 2, "parallel.pp_microbatches: expected at least pp=2, got 1"),
    (dict(tp=3), 3, "parallel.tp: expected a divisor of n_heads=4, got 3"),
])
def test_validate_messages(kwargs, world, msg):
    with pytest.raises(ConfigError) as e:
        ParallelConfig(**kwargs).validate(world, TINY)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(ep=0), "parallel.ep: expected an int >= 1, got 0"),
    (dict(dp_shard="2"), "parallel.dp_shard: expected an int, got '2'"),
    (dict(pp_schedule="GPipe"), "parallel.pp_schedule: expected one of '1F1B', 'Interleaved1F1B'"),
    (dict(dp_shard=2, ep=4), "parallel.ep: expected a divisor of dp_shard=2, got 4"),
])
def test_field_messages(kwargs, msg):
    with pytest.raises(ConfigError, match="^" + msg.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig(**kwargs)


def test_valid_layouts():
    assert ParallelConfig(dp_shard=8, ep=4, dp_replicate=2).validate(16, TINY).mesh_shape == (1, 2, 2, 4, 1)
    assert ParallelConfig(pp=2, pp_schedule="DualPipeV", pp_microbatches=4).validate(2, TINY).world_size == 2
    with pytest.raises(ConfigError, match="^parallel.ep: expected 1 for a model without MoE"):
        ParallelConfig(dp_shard=2, ep=2).validate(2, TINY.replace(n_routed_experts=0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        ParallelConfig().ep = 2  # frozen


def _mesh_worker(rank, out_dir):
    import torch.distributed as dist
    mesh = ParallelConfig(dp_shard=2, ep=2).validate(2, TINY).build_mesh("cpu")
    ep = mesh["ep"]
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=ep.get_group())
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(f"{mesh.mesh_dim_names}|{ep.size()}|{ep.get_local_rank()}|{t.item()}")


def test_build_mesh_two_processes(tmp_path):
    spawn_gloo(_mesh_worker, 2, str(tmp_path))
    for rank in range(2):
        names, size, local, total = (tmp_path / f"{rank}.txt").read_text().split("|")
        assert names == str(MESH_DIMS) and size == "2" and local == str(rank) and float(total) == 3.0
