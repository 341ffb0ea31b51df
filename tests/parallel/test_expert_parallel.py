"""EP=2 over 2 gloo processes equals the 1-process MoE layer: outputs, gradients, bias update, bytes sent."""
import os

import torch

from kdarch.config import get_preset
from kdarch.model.moe import MoE
from kdarch.testing import spawn_gloo

CFG = get_preset("debug").replace(n_routed_experts=8, n_group=1, topk_group=1, bias_update_speed=0.01)
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, another summation order than the 1-process layer
N_TOKENS = (6, 40)  # rank 0 / rank 1 local tokens: uneven


def _layer() -> MoE:
    torch.manual_seed(0)
    moe = MoE(CFG)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return moe.train()


def _inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(1, N_TOKENS[rank], CFG.hidden_size, generator=g)
    if rank == 1:
        x[:, :20] += 3.0 * _layer().gate.weight[5]  # push many of rank 1's tokens towards expert 5 (on rank 1)
    return x.detach()


def _run(moe, x):
    x = x.detach().clone().requires_grad_(True)
    y, _ = moe(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad


def _worker(rank, out_dir):
    from safetensors.torch import save_file

    from kdarch.parallel.config import ParallelConfig
    from kdarch.parallel.expert_parallel import all_reduce_expert_load, apply_expert_parallel, ep_bytes_sent
    mesh = ParallelConfig(dp_shard=2, ep=2).validate(2, CFG).build_mesh("cpu")
    moe = apply_expert_parallel(_layer(), mesh["ep"])
    y, gx = _run(moe, _inputs(rank))
    all_reduce_expert_load(moe)
    moe.update_bias()
    out = {"y": y, "gx": gx, "bias": moe.gate.bias.clone(), "bytes": torch.tensor(ep_bytes_sent(moe))}
    out.update({f"g.{n}": p.grad for n, p in moe.named_parameters()})
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"{rank}.safetensors"))


def test_ep2_matches_single_process(tmp_path):
    from safetensors.torch import load_file
    spawn_gloo(_worker, 2, str(tmp_path))
    res = [load_file(str(tmp_path / f"{r}.safetensors")) for r in range(2)]

    ref = _layer()
    L = CFG.n_routed_experts // 2
    grads = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    ids = []
    for rank in range(2):
        ref.zero_grad()
        x = _inputs(rank)
        ids.append(ref.gate(x.reshape(-1, CFG.hidden_size))[0])
        y, gx = _run(ref, x)
        torch.testing.assert_close(res[rank]["y"], y, **TOL)
        torch.testing.assert_close(res[rank]["gx"], gx, **TOL)
        for n, p in ref.named_parameters():
            grads[n] += p.grad
            if n not in ("w_gate_up", "w_down"):  # replicated: each rank's own tokens' gradient
                torch.testing.assert_close(res[rank][f"g.{n}"], p.grad, **TOL)
    for rank in range(2):  # an expert shard gathers the gradient of every rank's copies routed to it
        for n in ("w_gate_up", "w_down"):
            torch.testing.assert_close(res[rank][f"g.{n}"], grads[n][rank * L:(rank + 1) * L], **TOL)
    # the uneven case really happened: rank 1 sends its local expert far more copies than rank 0 receives
    ids_rank = [(i // L) for i in ids]
    assert (ids_rank[1] == 1).sum() > 3 * (ids_rank[0] == 1).sum()
    # bias: identical on both ranks, equal to the 1-process update on the concatenated batch (hand formula)
    ref.tokens_per_expert.zero_()
    ref(torch.cat([_inputs(0), _inputs(1)], dim=1))
    load = torch.bincount(torch.cat(ids).flatten(), minlength=CFG.n_routed_experts).float()
    torch.testing.assert_close(ref.tokens_per_expert, load)
    ref.update_bias()
    expected_bias = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(ref.gate.bias, expected_bias)
    assert torch.equal(res[0]["bias"], expected_bias) and torch.equal(res[1]["bias"], expected_bias)
    # bytes: copies sent to the other rank in dispatch + copies it sent back in combine, fp32 rows of width D
    row = CFG.hidden_size * 4
    for rank in range(2):
        to_other = int((ids_rank[rank] != rank).sum())
        from_other = int((ids_rank[1 - rank] == rank).sum())
        assert int(res[rank]["bytes"]) == (to_other + from_other) * row
