"""kdarch plan: every figure against a hand calculation on a small config (written out below, never taken from
the module's helpers), validation errors, search, the CLI, and the state memory of a real one-process AdamW step.

The small config S: d 8, 2 heads, q_lora 4, kv_lora 4, nope 2 + rope 2 (qk 4), v 2, vocab 100; block 0 dense
(intermediate 16), block 1 MoE (4 experts of width 4, top-2, 1 shared); no MTP, untied head.
  attention: wq_a 8*4=32, q_norm 4, wq_b 4*2*4=32, wkv_a 8*(4+2)=48, kv_norm 4, wkv_b 4*2*(2+2)=32, wo 2*2*8=32,
             2 block norms 16                                         -> 200
  dense block: 200 + 3*8*16=384                                       -> 584
  MoE block: 200 + router 8*4=32 + 4 experts * 3*8*4=96 + shared 96   -> 712 (active: 200+32+3*96 = 520)
  embedding 800 + head 800 + final norm 8                             -> total 2904, active 2712
"""
import json
import math

import pytest
import torch

from kdarch import CausalLM, get_preset
from kdarch.checks import ConfigError
from kdarch.cli import main
from kdarch.config import ModelConfig
from kdarch.convert.hf import kdarch_config_to_hf
from kdarch.parallel.cluster import Cluster
from kdarch.parallel.plan import (
    Plan,
    blocks_per_stage,
    bubble_time,
    estimate,
    in_flight_microbatches,
    load_model_config,
    search,
)

S = ModelConfig(vocab_size=100, hidden_size=8, n_layers=2, n_heads=2, max_seq_len=64, q_lora_rank=4, kv_lora_rank=4,
                qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2, intermediate_size=16, n_dense_layers=1,
                moe_intermediate_size=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
                topk_group=1, n_mtp_modules=0)
CLUSTER = Cluster(gpus=8, gpus_per_node=2, gpu_memory_gib=1.0, intra_node_gbps=400.0, inter_node_gbps=50.0,
                  peak_tflops=989.0)
# pp 2 (1F1B) x dp_shard 4, ep 4 over 2-GPU nodes, ZeRO-3, bf16 params + fp32 master, fp32 grads and moments
PLAN = Plan(dp_shard=4, ep=4, pp=2, pp_microbatches=4, seq_len=16, zero_stage=3)


def test_parameter_counts_by_hand():
    e = estimate(S, CLUSTER, PLAN)
    assert (e.params_total, e.params_active) == (2904, 2712)
    assert S.num_params() == 2904  # the config agrees with the hand count


def test_memory_per_device_by_hand():
    m = estimate(S, CLUSTER, PLAN).memory
    # stages [dense], [MoE]. rank 1 (the fuller): non-expert 200+32+96 + head 800 + norm 8 = 1136, sharded over
    # dp_shard 4; its 1 expert (96 params) sharded over dp_shard*tp/ep = 1
    assert m.params == 1136 * 2 / 4 + 96 * 2  # bf16, ZeRO-3
    assert m.grads == 1136 * 4 / 4 + 96 * 4
    assert m.optimizer == 1136 * (4 + 4 + 4) / 4 + 96 * 12  # two fp32 moments + fp32 master
    # activations per token (bf16 values): attention 2d 16 + 2 q_lora 8 + 2 kv_lora 8 + rope 2 + 2H qk 16 + 2H v 8
    # + lse 2H 4 = 62; MoE: 62 + 2d 16 + scores 2E 8 + K (2d + 3I) = 2*28 + shared 3*4 -> 154 values
    per_mb = 154 * 16 * 2  # T = 16 tokens, 2 bytes
    logits = 16 * 100 * 4 * 2  # fp32 logits + their gradient, one micro-batch
    assert m.in_flight_microbatches == 2  # 1F1B over pp 2
    assert m.activations_per_microbatch == per_mb
    assert m.activations_no_recompute == 2 * per_mb + logits
    assert m.activations_recompute == 2 * 1 * 16 * 8 * 2 + per_mb + logits  # block inputs [T, d] + one block
    assert m.total == m.params + m.grads + m.optimizer + 2 * per_mb + logits == 760 + 1520 + 4560 + 22656
    assert m.capacity == 0.9 * 2**30 and m.fits


def test_all_to_all_bytes_by_hand():
    e = estimate(S, CLUSTER, PLAN)
    # 1 MoE block x 4 micro-batches x 16 tokens x top-2 = 128 copies; per copy: dispatch bf16 2d + combine 2d
    # forward, both gradients backward 2 * 2d = 64 bytes; ep 4 over 2-GPU nodes: 1/4 stays, 1/4 in the node, 1/2 leaves
    assert e.a2a_bytes_intra == 128 * 64 / 4 == 2048
    assert e.a2a_bytes_inter == 128 * 64 / 2 == 4096
    assert e.a2a_time_s == pytest.approx(2048 / 400e9 + 4096 / 50e9)
    fp8 = estimate(S, CLUSTER, PLAN.replace(dispatch_dtype="fp8", recompute=True))
    # fp8 dispatch: d bytes, no scale for d < 128; recompute sends the forward twice: 2 (8 + 16) + 32 = 80 bytes
    assert fp8.a2a_bytes_inter == 128 * 80 / 2


def test_bubbles_and_in_flight_by_hand():
    # F 1, B 2, W 1 over pp 4: 1F1B 3*3; interleaved half; ZB-V 3*(1+2-3)/2; DualPipeV 3*((1+2)+2-3)/2
    assert [bubble_time(s, 4, 1, 2, 1) for s in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")] == \
        [9, 4.5, 0, 3]
    assert bubble_time("ZBVZeroBubble", 4, 1, 3, 1) == 1.5 and bubble_time("DualPipeV", 4, 1, 3, 1) == 6
    assert bubble_time("1F1B", 1, 1, 2, 1) == 0
    assert [in_flight_microbatches(s, 4, 16) for s in ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV")] == \
        [4, 5.5, 4, 4.5]
    assert in_flight_microbatches("1F1B", 4, 2) == 2
    e = estimate(S, CLUSTER, PLAN)
    assert e.bubble_fraction["1F1B"] == pytest.approx(1 / 5)  # (pp-1) / (m + pp - 1), pp 2, m 4


def test_stage_balance_by_hand():
    assert blocks_per_stage([1, 1, 1, 1, 5], 2) == [4, 1]  # loads 4 | 5 (the even 3 | 2 split: 3 | 6)
    assert blocks_per_stage([1] * 6, 3) == [2, 2, 2]
    # V-shape over 2 ranks (stages 0 and 3 on rank 0, 1 and 2 on rank 1); the heavy last block alone on stage 3
    # with one block on stage 0 gives rank 0 = 1 + 4 and rank 1 = the five other blocks: 5 | 5, the only balance
    costs = [1, 1, 1, 1, 1, 1, 4]
    sizes = blocks_per_stage(costs, 4, [0, 1, 1, 0])
    edges = [sum(sizes[:i]) for i in range(5)]
    load = [sum(costs[edges[i]:edges[i + 1]]) for i in range(4)]
    assert (sizes[0], sizes[3], load[0] + load[3], load[1] + load[2]) == (1, 1, 5, 5)


def test_flops_and_step_time_by_hand():
    e = estimate(S, CLUSTER, PLAN, mfu=0.5)
    attn = 16 * 2 * (4 + 2)  # per token per layer forward: T H (d_qk + d_v), causal
    assert e.flops_per_token == 6 * (584 + 520 + 800) + 3 * 2 * attn
    busiest = 2 * 520 + attn + 2 * 800  # rank 1: the MoE block and the head
    f = busiest * 16 / (0.5 * 989e12)
    assert e.compute_time_s == pytest.approx(4 * 3 * f) and e.bubble_time_s == pytest.approx(3 * f)
    # ZeRO-3 on rank 0 (1384 non-expert params over 4): every micro-batch all-gathers bf16 params twice and
    # reduce-scatters fp32 grads, (3/4) of them over the network (dp 4 spans two nodes); hidden under compute
    dp_s = 1384 * 3 / 4 * (2 * 2 + 4) * 4 / 50e9
    assert e.dp_comm_s == pytest.approx(dp_s)
    exposed = max(0.0, dp_s - e.compute_time_s) + e.a2a_time_s
    assert e.step_time_s == pytest.approx(e.compute_time_s + e.bubble_time_s + exposed)
    assert e.tokens_per_s == pytest.approx(16 * 16 / e.step_time_s)  # 16 sequences of 16 tokens
    assert e.assumptions and all(isinstance(a, str) for a in e.assumptions)


@pytest.mark.parametrize("change, message", [
    (dict(ep=3), "parallel.ep: expected a divisor of n_routed_experts=4, got 3"),
    (dict(dp_shard=2), "parallel.dp_shard: expected dp_replicate*dp_shard*pp*tp = gpus=8, got 1*2*2*1 = 4"),
    (dict(tp=3, dp_shard=1), "parallel.tp: expected a divisor of n_heads=2"),
    (dict(pp_schedule="DualPipeV"), "parallel.pp: expected at most 1 ranks"),
    (dict(pp_microbatches=1), "parallel.pp_microbatches: expected >= 2 for 1F1B with pp=2, got 1"),
    (dict(pp_microbatches=None, global_batch=10), "parallel.global_batch: expected micro_batch_size*dp*"),
    (dict(seq_len=65), "parallel.seq_len: expected <= the model's max_seq_len=64, got 65"),
])
def test_plan_errors_name_the_field(change, message):
    with pytest.raises(ConfigError) as e:
        estimate(S, CLUSTER, PLAN.replace(**change))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_plan_field_types_and_choices():
    with pytest.raises(ConfigError, match=r"^parallel\.pp: expected an int, got 'two'$"):
        Plan(pp="two")
    with pytest.raises(ConfigError, match=r"^parallel\.pp_schedule: expected one of '1F1B'"):
        Plan(pp_schedule="GPipe")
    with pytest.raises(ConfigError, match=r"^cluster\.gpu_memory_gib: expected a number > 0, got 0"):
        Cluster(gpu_memory_gib=0)
    with pytest.raises(ConfigError, match=r"^parallel\.pp_schedule: expected '1F1B' when pp=1"):
        estimate(S, Cluster(gpus=1), Plan(pp_schedule="ZBVZeroBubble", seq_len=16))


def test_search_returns_only_valid_fitting_plans_fastest_first():
    cluster = Cluster(gpus=8, gpus_per_node=4, gpu_memory_gib=1.0)
    found = search(S, cluster, Plan(seq_len=16, global_batch=32))
    assert found
    for e in found:
        p = e.plan
        assert p.dp_replicate * p.dp_shard * p.pp * p.tp == 8 and S.n_routed_experts % p.ep == 0
        assert S.n_heads % p.tp == 0 and (p.dp_shard * p.tp) % p.ep == 0 and p.sequences == 32
        assert p.pp * (1 if p.pp_schedule == "1F1B" else 2) <= 2 and e.memory.fits
    speeds = [e.tokens_per_s for e in found]
    assert speeds == sorted(speeds, reverse=True)
    assert {e.plan.ep for e in found} >= {1, 2, 4} and {e.plan.tp for e in found} >= {1, 2}
    # a device too small for any plan: nothing is returned
    assert search(S, Cluster(gpus=8, gpus_per_node=4, gpu_memory_gib=1e-6), Plan(seq_len=16, global_batch=32)) == []


def test_deepseek_v3_named_config_matches_the_published_sizes():
    cfg = load_model_config("deepseek-v3-671b")
    assert cfg.num_params(include_mtp=False) == pytest.approx(671e9, rel=0.01)  # "671B total"
    assert cfg.num_active_params() == pytest.approx(37e9, rel=0.02)  # "37B activated per token"
    # "14B MTP module": its block and projection, plus the embedding and head it shares (stored again there)
    mtp = cfg.num_params() - cfg.num_params(include_mtp=False) + 2 * 129280 * 7168
    assert mtp == pytest.approx(14e9, rel=0.05)


def test_adamw_state_memory_matches_a_real_cpu_step():
    torch.manual_seed(0)
    cfg = get_preset("debug")
    model = CausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    params = list(model.parameters())
    real = sum(p.numel() * p.element_size() for p in params)
    real += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    real += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    plan = Plan(seq_len=16, pp_microbatches=1, param_dtype="fp32", grad_dtype="fp32", optim_dtype="fp32",
                master_weights=False)
    m = estimate(cfg, Cluster(gpus=1, gpu_memory_gib=80.0), plan).memory
    assert math.isclose(m.params + m.grads + m.optimizer, real, rel_tol=0.10), (m.params + m.grads + m.optimizer, real)


def test_cli_plan_text_json_and_errors(capsys, tmp_path):
    base = ["plan", "debug", "--gpus", "8", "--gpus-per-node", "4", "--seq-len", "16", "--global-batch", "32"]
    assert main(base + ["--pp", "2", "--ep", "4"]) == 0
    out = capsys.readouterr().out
    assert "memory/device" in out and "bubble fraction" in out and "assumptions:" in out
    assert main(base + ["--pp", "2", "--ep", "4", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["plan"]["dp_shard"] == 4 and row["plan"]["ep"] == 4 and row["memory"]["fits"] is True
    assert main(base + ["--search", "--json", "--top", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    speeds = [r["tokens_per_s"] for r in rows]
    assert len(rows) == 3 and speeds == sorted(speeds, reverse=True) and all(r["memory"]["fits"] for r in rows)
    assert main(base + ["--ep", "3"]) == 2
    assert capsys.readouterr().err.strip() == \
        "kdarch plan: error: parallel.ep: expected a divisor of n_routed_experts=8, got 3"
    # a Hugging Face config.json plans like the preset it came from
    (tmp_path / "config.json").write_text(json.dumps(kdarch_config_to_hf(get_preset("debug"))))
    assert main(["plan", str(tmp_path / "config.json"), "--gpus", "1", "--seq-len", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == get_preset("debug").num_params()
    assert main(["plan", str(tmp_path / "missing.json"), "--gpus", "1"]) == 2
    assert "CONFIG: expected a model name" in capsys.readouterr().err


def test_plan_and_parallel_config_describe_one_layout():
    from kdarch.parallel.config import ParallelConfig
    layout = ParallelConfig(dp_replicate=2, dp_shard=4, ep=2, pp=2, pp_schedule="DualPipeV", pp_microbatches=8)
    plan = Plan.from_parallel(layout, seq_len=128, recompute=True)
    assert (plan.dp, plan.ep, plan.pp, plan.microbatches, plan.recompute) == (8, 2, 2, 8, True)
    assert plan.parallel == layout
    assert Plan.from_parallel(layout, pp_microbatches=16).microbatches == 16  # the estimate's fields win
    assert Plan(dp_shard=2, pp=2, global_batch=8).parallel.pp_microbatches == 4  # 8 rows over 2 data ranks
    with pytest.raises(ConfigError, match=r"^parallel\.ep: expected a divisor of dp_shard=1, got 2$"):
        _ = Plan(tp=2, ep=2).parallel  # ep ranks borrowed from tp: the estimate takes it, the train loop does not
