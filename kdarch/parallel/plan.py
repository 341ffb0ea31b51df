"""Scale-out on paper: per-device memory, expert all-to-all traffic, pipeline bubbles and step time of a
parallel plan for a ModelConfig on a cluster no test can reach, so a run is sized before it is launched.

Everything is closed-form arithmetic over the config's own shapes; every modelling choice is returned in
`Estimate.assumptions`. The ranks form one mesh gpus = pp * dp_replicate * dp_shard * tp; expert parallelism
borrows its ep ranks from dp_shard * tp (as torchtitan does), the dp_shard * tp / ep ranks that hold the same
experts shard their state (expert data parallel).

Legend: d hidden, H heads, E routed experts, K experts per token, I expert width, T tokens of one micro-batch,
m micro-batches per step, F / B / W one rank's forward / full backward / weight-gradient time per micro-batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

from kdarch.checks import ConfigError, check
from kdarch.config import ModelConfig
from kdarch.parallel.cluster import DTYPE_BYTES, MODELS, SCHEDULES, Cluster, Plan, check_plan, load_model_config

__all__ = ["DEFAULT_MFU", "DTYPE_BYTES", "MODELS", "SCHEDULES", "Estimate", "Memory", "Plan",
           "activation_values_per_token", "blocks_per_stage", "bubble_time", "check_plan", "estimate",
           "format_estimate", "in_flight_microbatches", "load_model_config", "search"]

DEFAULT_MFU = 0.4
"""Fraction of peak the GEMMs and attention reach while busy (bubbles and exposed communication come on top).
DeepSeek-V3's 14.8T tokens in 2.664M H800 pre-training hours is ~1540 tokens/s/GPU, ~0.39 of the 989 TFLOP/s bf16
peak counted on 6N + attention FLOPs: a large, well-tuned FP8 run, so 0.4 is an upper end for most."""


# --- the model, block by block ------------------------------------------------------------------------------
def blocks_per_stage(costs: list[float], n_stages: int, owner: list[int] | None = None) -> list[int]:
    """Whole consecutive blocks per stage, each stage at least one, balancing the ranks that own the stages
    (`owner[stage]`, default one rank per stage): the slowest rank sets a pipeline's pace. From the most even
    split by count, a boundary moves by one block while that lowers (max rank load, sum of squared loads)."""
    check(1 <= n_stages <= len(costs), "n_stages", f"an int in [1, {len(costs)}] (one block at least per stage)",
          n_stages)
    return list(_balance(tuple(costs), n_stages, tuple(owner or range(n_stages))))


@functools.lru_cache(maxsize=1024)
def _balance(costs: tuple[float, ...], n_stages: int, owner: tuple[int, ...]) -> tuple[int, ...]:
    q, r = divmod(len(costs), n_stages)
    sizes = [q + (s < r) for s in range(n_stages)]

    def score(sz: list[int]) -> tuple[float, float]:
        loads, i = [0.0] * (max(owner) + 1), 0
        for s, n in enumerate(sz):
            loads[owner[s]] += sum(costs[i:i + n])
            i += n
        return max(loads), sum(x * x for x in loads)

    best = score(sizes)
    while True:
        moves = [(s, step) for s in range(n_stages - 1) for step in (1, -1)]
        trials = []
        for s, step in moves:  # move one block across the boundary after stage s
            sz = sizes.copy()
            sz[s], sz[s + 1] = sz[s] + step, sz[s + 1] - step
            if min(sz[s], sz[s + 1]) >= 1:
                trials.append((score(sz), sz))
        if not trials or min(trials)[0] >= best:
            return tuple(sizes)
        best, sizes = min(trials)


def _rank_of_stage(stage: int, plan: Plan) -> int:
    if plan.pp_schedule in ("ZBVZeroBubble", "DualPipeV"):  # V: rank r holds stages r and 2pp-1-r
        return stage if stage < plan.pp else 2 * plan.pp - 1 - stage
    return stage % plan.pp  # 1F1B: one stage per rank; interleaved: round robin


def activation_values_per_token(cfg: ModelConfig, moe: bool) -> int:
    """bf16-sized values one block keeps for its backward per token (fp32 values count twice), no recompute.

    MLA: block input + normed input (2d), q latent before/after its norm (2 q_lora), kv latent before/after its
    norm + roped key (2 kv_lora + rope), q and k (2 H (nope+rope)), v and the attention output (2 H v), the
    flash-attention log-sum-exp (H fp32). No [T, T] scores (a fused attention kernel). MoE FFN: input + normed
    input (2d), router scores (E fp32), per routed copy its input, gate, up, gated product and output
    (K (2d + 3I)), shared experts' gate, up, product (3 n_shared I). Dense FFN: 2d + 3 * intermediate."""
    d, h = cfg.hidden_size, cfg.n_heads
    attn = 2 * d + 2 * cfg.q_lora_rank + 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim
    attn += 2 * h * cfg.qk_head_dim + 2 * h * cfg.v_head_dim + 2 * h
    if not moe:
        return attn + 2 * d + 3 * cfg.intermediate_size
    i, k = cfg.moe_intermediate_size, cfg.num_experts_per_tok
    return attn + 2 * d + 2 * cfg.n_routed_experts + k * (2 * d + 3 * i) + 3 * cfg.n_shared_experts * i


@dataclass
class _Rank:
    """One pipeline rank's share: parameters (already split over tp / ep), forward FLOPs and activations per token."""
    dense: float = 0.0  # non-expert parameters on this device
    experts: float = 0.0  # routed-expert parameters on this device
    fwd_flops: float = 0.0  # forward FLOPs per token of the micro-batch, this device's part
    act_values: float = 0.0  # kept values per token, no recompute (this device's share under tp)
    max_block_values: float = 0.0  # one block's values: the transient of a recomputed block
    blocks: int = 0
    moe_blocks: int = 0
    logits: bool = False


def _block(cfg: ModelConfig, layer_id: int, plan: Plan, seq_len: int) -> _Rank:
    d, h, t = cfg.hidden_size, cfg.n_heads, plan.tp
    ql = cfg.q_lora_rank
    split = (ql * h * cfg.qk_head_dim if ql else d * h * cfg.qk_head_dim)  # wq_b (or wq), column-wise
    split += cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim) + h * cfg.v_head_dim * d  # wkv_b, wo
    whole = d * ql + ql + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank + 2 * d  # wq_a, wkv_a, norms
    active = split + whole
    moe = cfg.is_moe_layer(layer_id)
    r = _Rank(blocks=1, moe_blocks=int(moe))
    if layer_id >= cfg.n_layers:  # an MTP module: enorm, hnorm, the head's norm, eh_proj [d, 2d]
        whole += 3 * d + 2 * d * d
        active += 3 * d + 2 * d * d
    if moe:
        expert = 3 * d * cfg.moe_intermediate_size
        whole += d * cfg.n_routed_experts
        split += cfg.n_shared_experts * expert
        r.experts = cfg.n_routed_experts // plan.ep * expert
        active += d * cfg.n_routed_experts + (cfg.num_experts_per_tok + cfg.n_shared_experts) * expert
    else:
        split += 3 * d * cfg.intermediate_size
        active += 3 * d * cfg.intermediate_size
    r.dense = split / t + whole
    attn_core = seq_len * h * (cfg.qk_head_dim + cfg.v_head_dim)  # QK^T and PV: 2 T H (dqk + dv) FLOPs, halved causal
    r.fwd_flops = (2 * active + attn_core) / t
    r.act_values = r.max_block_values = activation_values_per_token(cfg, moe) / t
    return r


def _ranks(cfg: ModelConfig, plan: Plan) -> tuple[list[_Rank], list[int]]:
    """What each of the pp ranks holds; embedding on the first stage, final norm + head (+ MTP) on the last;
    stages balanced on forward FLOPs, the heads counted with the last block."""
    d, v, t = cfg.hidden_size, cfg.vocab_size, plan.tp
    n_stages = plan.pp * plan.stages_per_rank
    blocks = [_block(cfg, i, plan, plan.seq_len) for i in range(cfg.n_layers + cfg.n_mtp_modules)]
    head_flops = (1 + cfg.n_mtp_modules) * 2 * v * d / t  # main head and the MTP modules' shared head
    sizes = blocks_per_stage([b.fwd_flops for b in blocks[:-1]] + [blocks[-1].fwd_flops + head_flops], n_stages,
                             [_rank_of_stage(st, plan) for st in range(n_stages)])
    ranks = [_Rank() for _ in range(plan.pp)]
    it = iter(blocks)
    for stage, n in enumerate(sizes):
        r = ranks[_rank_of_stage(stage, plan)]
        for b in (next(it) for _ in range(n)):
            for f in ("dense", "experts", "fwd_flops", "act_values", "blocks", "moe_blocks"):
                setattr(r, f, getattr(r, f) + getattr(b, f))
            r.max_block_values = max(r.max_block_values, b.max_block_values)
    first, last = ranks[_rank_of_stage(0, plan)], ranks[_rank_of_stage(n_stages - 1, plan)]
    first.dense += v * d / t
    if not (cfg.tie_word_embeddings and first is last):
        last.dense += v * d / t
    last.dense += d
    last.fwd_flops += head_flops
    last.logits = True
    return ranks, sizes


# --- schedules ----------------------------------------------------------------------------------------------
def in_flight_microbatches(schedule: str, pp: int, microbatches: int) -> float:
    """Peak micro-batches whose activations a rank holds, in units of all of that rank's blocks.

    1F1B and ZB-V (zero-bubble paper: 1F1B's memory): pp. Interleaved 1F1B with 2 stages per rank: rank 0 warms
    up 2 (pp-1) + pp half-rank chunks and holds one more, (3 pp - 1) / 2. DualPipe holds pp + 1 stage-sized
    chunks (its README); DualPipeV has the same chunks over half the ranks: (2 pp + 1) / 2 rank units."""
    n = {"1F1B": pp, "ZBVZeroBubble": pp, "Interleaved1F1B": (3 * pp - 1) / 2, "DualPipeV": (2 * pp + 1) / 2}[schedule]
    return min(float(n), float(microbatches))


def bubble_time(schedule: str, pp: int, f: float, b: float, w: float) -> float:
    """Idle time per step of one rank, F / B / W being that rank's whole per-micro-batch times.

    1F1B (pp-1)(F+B). Interleaved, 2 chunks per rank: half of it. ZB-V, chunks of F/2: (pp-1)(F+B-3W)/2, zero when
    F = dgrad = W. DualPipe's (PP/2-1)(F&B + B - 3W) on chunks of half a rank with PP = 2 pp stages:
    (pp-1)(F&B + B - 3W)/2, F&B = F + B (overlap hides communication, not compute)."""
    if pp <= 1:
        return 0.0
    return max(0.0, {"1F1B": (pp - 1) * (f + b), "Interleaved1F1B": (pp - 1) * (f + b) / 2,
                     "ZBVZeroBubble": (pp - 1) * (f + b - 3 * w) / 2,
                     "DualPipeV": (pp - 1) * ((f + b) + b - 3 * w) / 2}[schedule])


# --- the estimate ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Bytes on the fullest device."""
    params: float
    grads: float
    optimizer: float
    activations: float
    activations_no_recompute: float
    activations_recompute: float
    activations_per_microbatch: float
    in_flight_microbatches: float
    total: float
    capacity: float

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass(frozen=True)
class Estimate:
    model: str
    plan: Plan
    cluster: Cluster
    params_total: int
    params_active: int
    memory: Memory
    a2a_bytes_intra: float
    a2a_bytes_inter: float
    a2a_time_s: float
    tp_comm_s: float
    dp_comm_s: float
    comm_exposed_s: float
    bubble_fraction: dict[str, float]
    flops_per_token: float
    compute_time_s: float
    bubble_time_s: float
    step_time_s: float
    tokens_per_s: float
    tokens_per_gpu_hour: float
    mfu: float
    assumptions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"]["fits"] = self.memory.fits
        return out


def estimate(cfg: ModelConfig, cluster: Cluster, plan: Plan, *, mfu: float = DEFAULT_MFU,
             usable_memory: float = 0.9, overlap_ep_comm: bool | None = None, model: str = "") -> Estimate:
    """Memory, all-to-all, bubbles and speed of `plan`; `usable_memory` of each device's memory is for tensors (the
    rest: allocator, NCCL, CUDA context); overlap_ep_comm (default: with DualPipeV) hides the all-to-all."""
    check_plan(cfg, cluster, plan)
    check(0 < mfu <= 1, "mfu", "a number in (0, 1]", mfu)
    overlap = plan.pp_schedule == "DualPipeV" if overlap_ep_comm is None else overlap_ep_comm
    d, k, m, tp, s = cfg.hidden_size, cfg.num_experts_per_tok, plan.microbatches, plan.tp, plan.seq_len
    t_mb = plan.micro_batch_size * s  # tokens of one micro-batch (per tp group)
    pb, gb, ob = (DTYPE_BYTES[x] for x in (plan.param_dtype, plan.grad_dtype, plan.optim_dtype))
    master = 4 if plan.master_weights and plan.param_dtype != "fp32" else 0
    shard_d = plan.dp_shard  # ranks sharing the same non-expert weights that shard them
    shard_e = plan.dp_shard * tp // plan.ep  # ranks holding the same experts
    z = plan.zero_stage
    in_flight = in_flight_microbatches(plan.pp_schedule, plan.pp, m)
    ranks, sizes = _ranks(cfg, plan)

    def mem(r: _Rank) -> Memory:
        def state(n: float, shard: int) -> tuple[float, float, float]:
            return (n * pb / (shard if z >= 3 else 1), n * gb / (shard if z >= 2 else 1),
                    n * (2 * ob + master) / (shard if z >= 1 else 1))
        p, g, o = (a + b for a, b in zip(state(r.dense, shard_d), state(r.experts, shard_e)))
        per_mb = r.act_values * t_mb * 2
        logits = t_mb * cfg.vocab_size / tp * 4 * 2 if r.logits else 0.0  # fp32 logits and their gradient, once
        no_rc = in_flight * per_mb + logits
        rc = in_flight * r.blocks * t_mb * d / tp * 2 + r.max_block_values * t_mb * 2 + logits  # inputs + 1 block
        act = rc if plan.recompute else no_rc
        return Memory(p, g, o, act, no_rc, rc, per_mb, in_flight, p + g + o + act,
                      cluster.gpu_memory_gib * 2**30 * usable_memory)

    memory = max((mem(r) for r in ranks), key=lambda x: x.total)
    busiest = max(ranks, key=lambda r: r.fwd_flops)
    f = busiest.fwd_flops * t_mb / (mfu * cluster.peak_tflops * 1e12)
    w = f  # weight gradients: the same GEMMs as the forward
    b = 2 * f + (f if plan.recompute else 0.0)  # input + weight gradients, plus the re-run forward
    compute = m * (f + b)
    bubble = bubble_time(plan.pp_schedule, plan.pp, f, b, w)
    bubbles = {sc: bubble_time(sc, plan.pp, f, b, w) for sc in SCHEDULES}
    bubbles = {sc: (x / (compute + x) if compute + x else 0.0) for sc, x in bubbles.items()}

    # expert all-to-all of the busiest MoE rank: every routed copy that leaves the device, dispatch + combine
    # forward, their gradients backward (bf16), the forward again under recompute
    moe_rank = max(ranks, key=lambda r: r.moe_blocks)
    disp = d * DTYPE_BYTES[plan.dispatch_dtype] + (d // 128 * 4 if plan.dispatch_dtype == "fp8" else 0)
    per_copy = (disp + 2 * d) * (2 if plan.recompute else 1) + 2 * (2 * d)
    copies = moe_rank.moe_blocks * m * (t_mb / tp) * k if cfg.has_moe else 0.0
    local = min(plan.ep, cluster.gpus_per_node)
    intra = copies * per_copy * (local - 1) / plan.ep
    inter = copies * per_copy * (plan.ep - local) / plan.ep
    a2a = intra / (cluster.intra_node_gbps * 1e9) + inter / (cluster.inter_node_gbps * 1e9)
    # tensor parallel (sequence parallel): all-gather + reduce-scatter of [T, d] around attention and FFN, forward
    # and backward (and the re-run forward), each moving (tp-1)/tp of the bf16 tensor; never hidden
    passes = 3 if plan.recompute else 2
    tp_s = (busiest.blocks * m * passes * 4 * t_mb * d * 2 * (tp - 1) / tp / (cluster.intra_node_gbps * 1e9)
            if tp > 1 else 0.0)
    # data parallel: ZeRO-1/2 reduce-scatter gradients + all-gather parameters once a step; ZeRO-3 all-gathers
    # parameters for every micro-batch's forward and backward and reduce-scatters its gradients; over the network
    # once the dp_shard group leaves a node; hidden under compute as far as compute lasts
    state_rank = max(ranks, key=lambda r: r.dense + r.experts)
    n_local = state_rank.dense * (plan.dp_shard - 1) / plan.dp_shard + state_rank.experts * (shard_e - 1) / shard_e
    dp_bytes = n_local * ((2 * pb + gb) * m if z >= 3 else pb + gb) + (
        2 * (state_rank.dense + state_rank.experts) * gb * (plan.dp_replicate - 1) / plan.dp_replicate)
    dp_bw = cluster.intra_node_gbps if plan.dp * tp <= cluster.gpus_per_node else cluster.inter_node_gbps
    dp_s = dp_bytes / (dp_bw * 1e9)
    exposed = max(0.0, dp_s + (a2a if overlap else 0.0) - compute) + (0.0 if overlap else a2a) + tp_s
    step = compute + bubble + exposed
    tokens = plan.sequences * s
    flops_tok = 3 * sum(r.fwd_flops for r in ranks) * tp  # 6 N_active + attention, embedding lookup excluded
    assumptions = [
        f"busy GEMM/attention efficiency mfu={mfu:g} of {cluster.peak_tflops:g} TFLOP/s; B = 2F"
        f"{' + F (recompute)' if plan.recompute else ''}, W = F, F&B = F + B",
        "FLOPs/token = 6 * active matmul params (heads incl.) + 3 T H (d_qk + d_v) causal attention per layer",
        "balanced routing: each token sends K copies, one stays on its device with probability 1/ep, in its node with "
        "(min(ep, gpus_per_node)-1)/ep; every copy counted (no node-limited de-duplication)",
        f"EP group packed on consecutive devices; all-to-all {'hidden under compute' if overlap else 'exposed'}",
        "ZeRO/FSDP traffic overlaps compute, tensor-parallel traffic never; pipeline sends not priced",
        f"activations per block: activation_values_per_token (bf16), fused attention, tp divides them all; "
        f"{in_flight:g} micro-batches in flight ({plan.pp_schedule}); recompute keeps block inputs + one block",
        f"usable memory {usable_memory:g} of {cluster.gpu_memory_gib:g} GiB; stages are whole blocks, "
        f"blocks per stage (balanced on forward FLOPs) {sizes}",
    ]
    return Estimate(model or "model", plan, cluster, cfg.num_params(), cfg.num_active_params(), memory, intra, inter,
                    a2a, tp_s, dp_s, exposed, bubbles, flops_tok, compute, bubble, step, tokens / step,
                    tokens / step / cluster.gpus * 3600, flops_tok * tokens / step / cluster.gpus
                    / (cluster.peak_tflops * 1e12), assumptions)


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def search(cfg: ModelConfig, cluster: Cluster, template: Plan | None = None, *, top: int | None = None,
           **kw) -> list[Estimate]:
    """Every valid plan (tp, pp, schedule, ep, recompute; the rest from `template`, dp_replicate = 1) that fits
    in memory, fastest first."""
    base = template or Plan()
    if base.global_batch is None:
        base = base.replace(global_batch=8 * cluster.gpus * base.micro_batch_size)
    out = []
    for tp in _divisors(math.gcd(cfg.n_heads, cluster.gpus_per_node)):
        for pp in _divisors(cluster.gpus // tp):
            dp_shard = cluster.gpus // (tp * pp)
            eps = _divisors(math.gcd(cfg.n_routed_experts, dp_shard * tp)) if cfg.has_moe else [1]
            for sched in (SCHEDULES if pp > 1 else ("1F1B",)):
                for ep in eps:
                    for rc in (False, True):
                        plan = base.replace(dp_replicate=1, dp_shard=dp_shard, tp=tp, pp=pp, pp_schedule=sched,
                                            ep=ep, recompute=rc, pp_microbatches=None)
                        try:
                            est = estimate(cfg, cluster, plan, **kw)
                        except ConfigError:
                            continue
                        if est.memory.fits:
                            out.append(est)
    out.sort(key=lambda e: -e.tokens_per_s)
    return out[:top] if top else out


def format_estimate(e: Estimate) -> str:
    """A few readable lines: the plan, memory of the fullest device, the all-to-all, bubbles and speed."""
    p, m, g = e.plan, e.memory, 2**30
    lines = [
        f"{e.model}: {e.params_total / 1e9:.2f}B params, {e.params_active / 1e9:.2f}B active/token; "
        f"{e.cluster.gpus} GPUs ({e.cluster.gpus_per_node}/node, {e.cluster.gpu_memory_gib:g} GiB)",
        f"plan: dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} (ZeRO-{p.zero_stage}) x pp {p.pp} "
        f"({p.pp_schedule}, {p.microbatches} micro-batches) x tp {p.tp}; ep {p.ep}; micro-batch {p.micro_batch_size}"
        f" x {p.seq_len} tokens, global batch {p.sequences}; recompute {'on' if p.recompute else 'off'}",
        f"memory/device: params {m.params / g:.2f} + grads {m.grads / g:.2f} + optimizer {m.optimizer / g:.2f} + "
        f"activations {m.activations / g:.2f} = {m.total / g:.2f} GiB of {m.capacity / g:.2f} usable "
        f"({'fits' if m.fits else 'DOES NOT FIT'}); activations without / with recompute "
        f"{m.activations_no_recompute / g:.2f} / {m.activations_recompute / g:.2f} GiB "
        f"({m.in_flight_microbatches:g} micro-batches in flight)",
        f"expert all-to-all/step/device: {e.a2a_bytes_intra / 1e9:.1f} GB intra-node + {e.a2a_bytes_inter / 1e9:.1f}"
        f" GB inter-node = {e.a2a_time_s:.2f} s; tensor-parallel {e.tp_comm_s:.2f} s, data-parallel "
        f"{e.dp_comm_s:.2f} s; {e.comm_exposed_s:.2f} s of it exposed",
        "bubble fraction: " + ", ".join(f"{k} {v:.1%}" for k, v in e.bubble_fraction.items()),
        f"{e.flops_per_token / 1e9:.1f} GFLOP/token; step {e.step_time_s:.2f} s (compute {e.compute_time_s:.2f} + "
        f"bubble {e.bubble_time_s:.2f} + exposed communication {e.comm_exposed_s:.2f}); "
        f"{e.tokens_per_s:,.0f} tokens/s, "
        f"{e.tokens_per_gpu_hour / 1e6:.3f}M tokens/GPU-hour, MFU {e.mfu:.1%}",
        "assumptions:", *(f"  - {a}" for a in e.assumptions)]
    return "\n".join(lines)
