"""On-policy distillation (GKD-style): the student writes, the teacher grades every token it wrote.

Off-policy KD trains the student on text it would not have written itself; at generation time it conditions on
its own tokens, so its errors compound on prefixes it never learnt from (exposure bias). On-policy KD closes that
gap: on a fraction λ of the optimizer steps the student continues prompts taken from the training rows (batched,
on its latent KV cache, without gradients), the teacher scores the sampled sequences, and the divergence is taken
on the sampled tokens only. Reverse KL is its natural divergence (mode seeking: the student is penalised where it
puts mass the teacher would not), which is what Qwen3's small models and GKD (λ, generalised JSD) use; any kind
of `kd_loss` works.

- `OnPolicySchedule(fraction, start)`: which steps sample. From step `start` on, step s (0-based) samples iff
  ⌊(s + 1)·λ⌋ > ⌊s·λ⌋, so the sampled steps are spread evenly, ⌊n·λ⌋ of the first n, and a resumed run takes
  the same steps; λ = 0 never samples (off-policy distillation, exactly), λ = 1 always does. A student samples
  garbage until it has learnt something, and a teacher's grades of garbage teach little: as in GKD, where the
  student is fine-tuned before it samples, `start` gives it off-policy steps first.
- `rollout(...)`: prompts (each row's first tokens, as `prompt_lengths` says) continued by up to `max_new_tokens`
  sampled tokens; returns the sequences [B, T'] (rows left-aligned, as training rows are, padded after an early
  end) and their labels, -100 everywhere but on the sampled tokens. The student's own samples are no ground
  truth, so a trainer puts no hard loss on them (α = 1 on sampled steps).
- `RolloutStats`: rollouts (micro-batches), sequences, sampled tokens and seconds spent sampling, for the report;
  under torch.distributed the sequences and tokens of every rank.

Sampling draws from a generator seeded by (seed, step), so a run and its resumption sample the same tokens; given
the rows' indices in the training set, each row draws from its own generator seeded by (seed, step, row), so a row's
tokens do not depend on the rows it is batched with, and a run under a data-parallel plan, where every data rank
samples its own rows, samples what one process does. Under torch.distributed every rank runs the same number of
decoding steps (an FSDP-sharded or expert-parallel model's forward is a collective): each rollout runs its full
length and is cut at its end-of-sequence token afterwards, and it decodes under `torch.no_grad`, as the training
step reuses FSDP's gathered weights, which inference mode would mark unusable for autograd.

Shape legend: B batch, T row length, P prompt length, R sampled tokens.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kdarch.checks import check, is_int, is_number
from kdarch.model.generation import generate

__all__ = ["OnPolicySchedule", "RolloutStats", "rollout", "tail_prompts"]


class OnPolicySchedule:
    """Which optimizer steps distil on the student's own samples: a fraction λ of those from `start` on, spread
    evenly."""

    def __init__(self, fraction: float, start: int = 0):
        check(is_number(fraction) and 0.0 <= fraction <= 1.0, "distill.on_policy", "a number in [0, 1]", fraction)
        check(is_int(start) and start >= 0, "OnPolicySchedule: start", "an int >= 0", start)
        self.fraction, self.start = float(fraction), start

    def __call__(self, step: int) -> bool:
        """Whether 0-based step `step` samples."""
        return step >= self.start and math.floor((step + 1) * self.fraction) > math.floor(step * self.fraction)


@dataclass
class RolloutStats:
    rollouts: int = 0
    sequences: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def tail_prompts(rollout_tokens: int) -> Callable[[torch.Tensor], list[int]]:
    """The prompt rule for packed text: each row but its last `rollout_tokens` tokens, so a sampled row has the
    training rows' length."""
    check(is_int(rollout_tokens) and rollout_tokens >= 1, "distill.rollout_tokens", "an int >= 1", rollout_tokens)

    def lengths(ids_BT: torch.Tensor) -> list[int]:
        T = ids_BT.shape[1]
        if T <= rollout_tokens:
            raise ValueError(f"distill.rollout_tokens: expected fewer than the {T} tokens of a training row (the "
                             f"rest is the prompt), got {rollout_tokens}")
        return [T - rollout_tokens] * ids_BT.shape[0]

    return lengths


@torch.no_grad()
def rollout(model, ids_BT: torch.Tensor, prompt_lengths: list[int], max_new_tokens: int, *, temperature: float,
            eos_token_id: int | None = None, pad_id: int = 0, seed: int = 0, rows: list[int] | None = None,
            stats: RolloutStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue row i's first `prompt_lengths[i]` tokens with up to `max_new_tokens` tokens sampled from `model`
    at `temperature` (stopping at `eos_token_id`, default the model's). Returns (ids [B, T'], labels [B, T'])
    with T' = max(P_i + R_i): prompts from position 0 followed by their samples, padded with `pad_id`; labels
    are the ids on sampled tokens and -100 elsewhere (prompt, padding). `rows` (the rows' indices in the training
    set): one generator per row, seeded by (seed, row). Compiled blocks run eagerly here."""
    B = ids_BT.shape[0]
    check(len(prompt_lengths) == B and all(is_int(p) and 1 <= p <= ids_BT.shape[1] for p in prompt_lengths),
          "rollout: prompt_lengths", f"{B} ints in [1, {ids_BT.shape[1]}]", prompt_lengths)
    check(is_int(max_new_tokens) and max_new_tokens >= 1, "rollout: max_new_tokens", "an int >= 1", max_new_tokens)
    t0 = time.perf_counter()
    if rows is None:
        gen = torch.Generator(ids_BT.device).manual_seed(seed)
    else:
        check(len(rows) == B, "rollout: rows", f"{B} row indices", rows)
        gen = [torch.Generator(ids_BT.device).manual_seed((seed * 1_000_003 + int(r)) % 2**63) for r in rows]
    prompts = [row[:p] for row, p in zip(ids_BT.tolist(), prompt_lengths)]
    lockstep = torch.distributed.is_available() and torch.distributed.is_initialized()
    eos = (model.config.eos_token_id if eos_token_id is None else eos_token_id) if lockstep else eos_token_id
    with torch.compiler.set_stance("force_eager"):  # decoding shapes would recompile every compiled block
        new = generate(model, prompts, max_new_tokens, temperature=temperature,
                       eos_token_id=-1 if lockstep else eos_token_id, generator=gen, inference_mode=not lockstep)
    if lockstep and eos is not None:  # what stopping at eos would have returned
        new = [n[:n.index(eos) + 1] if eos in n else n for n in new]
    T = max(len(p) + len(n) for p, n in zip(prompts, new))
    out_BT = torch.full((B, T), pad_id, dtype=torch.long)
    labels_BT = torch.full((B, T), -100, dtype=torch.long)
    for i, (p, n) in enumerate(zip(prompts, new)):
        out_BT[i, :len(p) + len(n)] = torch.tensor(p + n)
        labels_BT[i, len(p):len(p) + len(n)] = torch.tensor(n)
    if stats is not None:
        counts = [B, sum(map(len, new))]
        if lockstep:  # every data rank's rows (a plan that samples runs on data ranks only), as one process counts
            counts_2 = torch.tensor(counts, device=ids_BT.device)
            torch.distributed.all_reduce(counts_2)
            counts = counts_2.tolist()
        stats.rollouts, stats.sequences = stats.rollouts + 1, stats.sequences + counts[0]
        stats.tokens += counts[1]
        stats.seconds += time.perf_counter() - t0
    return out_BT.to(ids_BT.device), labels_BT.to(ids_BT.device)
