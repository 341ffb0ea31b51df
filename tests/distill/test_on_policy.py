"""On-policy rollouts: which steps sample, and what a rollout returns (against full-forward decoding)."""
import math

import pytest
import torch

from kdarch import CausalLM, get_preset
from kdarch.distill.on_policy import OnPolicySchedule, RolloutStats, rollout, tail_prompts


@pytest.mark.parametrize("fraction, want", [(0.0, []), (1.0, list(range(12))), (0.25, [3, 7, 11]),
                                            (0.5, [1, 3, 5, 7, 9, 11]), (1 / 3, [2, 5, 8, 11])])
def test_schedule_spreads_the_sampled_steps_evenly(fraction, want):
    sched = OnPolicySchedule(fraction)
    assert [s for s in range(12) if sched(s)] == want
    assert sum(sched(s) for s in range(1000)) == math.floor(1000 * fraction)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half"])
def test_schedule_refuses_a_fraction_outside_0_1(bad):
    with pytest.raises(ValueError, match=r"distill.on_policy: expected a number in \[0, 1\]"):
        OnPolicySchedule(bad)


def _model():
    torch.manual_seed(0)
    return CausalLM(get_preset("debug")).eval()


def _greedy_reference(model, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """Decoding by full forwards of the growing sequence (no cache, no batching)."""
    seq, new = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            tok = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            new.append(tok)
            seq.append(tok)
            if tok == eos:
                break
    return new


def test_greedy_rollout_matches_full_forward_decoding_with_prompts_of_different_lengths():
    model = _model()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    lengths = [5, 9, 12]
    out, labels = rollout(model, ids, lengths, 6, temperature=0.0, eos_token_id=-1)
    assert out.shape == labels.shape == (3, 18)
    for i, p in enumerate(lengths):
        want = _greedy_reference(model, ids[i, :p].tolist(), 6, None)
        assert out[i, :p].tolist() == ids[i, :p].tolist()  # the prompt, from position 0
        assert out[i, p:p + 6].tolist() == want
        assert (labels[i, :p] == -100).all() and labels[i, p:p + 6].tolist() == want  # only sampled tokens count
        assert (labels[i, p + 6:] == -100).all()


def test_a_rollout_ended_by_eos_is_padded_and_its_padding_ignored():
    model = _model()
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(2))
    free = _greedy_reference(model, ids[0].tolist(), 4, None)
    eos = free[1]  # row 0 stops after its second token
    out, labels = rollout(model, ids, [8, 8], 4, temperature=0.0, eos_token_id=eos, pad_id=7)
    row0 = _greedy_reference(model, ids[0].tolist(), 4, eos)
    assert labels[0, 8:8 + len(row0)].tolist() == row0 and row0[-1] == eos
    assert (out[0, 8 + len(row0):] == 7).all() and (labels[0, 8 + len(row0):] == -100).all()


def test_rows_seed_their_own_samples_whatever_they_are_batched_with():
    """With the rows' indices each row samples from its own generator: a row alone, or batched with others, or
    placed elsewhere in the batch, gets the same tokens (what lets data ranks sample their own rows)."""
    model = _model()
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(4))
    whole, _ = rollout(model, ids, [6] * 3, 5, temperature=1.0, eos_token_id=-1, seed=5, rows=[7, 2, 9])
    for i, r in enumerate([7, 2, 9]):
        alone, _ = rollout(model, ids[i:i + 1], [6], 5, temperature=1.0, eos_token_id=-1, seed=5, rows=[r])
        assert alone[0].tolist() == whole[i].tolist()
    swapped, _ = rollout(model, ids[[2, 0]], [6] * 2, 5, temperature=1.0, eos_token_id=-1, seed=5, rows=[9, 7])
    assert swapped.tolist() == whole[[2, 0]].tolist()
    other, _ = rollout(model, ids, [6] * 3, 5, temperature=1.0, eos_token_id=-1, seed=5, rows=[8, 2, 9])
    assert other[0, 6:].tolist() != whole[0, 6:].tolist() and other[1].tolist() == whole[1].tolist()


def test_sampling_is_reproducible_by_seed_and_stats_count_it():
    model = _model()
    ids = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(3))
    stats = RolloutStats()
    a = rollout(model, ids, [6] * 4, 4, temperature=1.0, eos_token_id=-1, seed=5, stats=stats)
    b = rollout(model, ids, [6] * 4, 4, temperature=1.0, eos_token_id=-1, seed=5, stats=stats)
    c = rollout(model, ids, [6] * 4, 4, temperature=1.0, eos_token_id=-1, seed=6)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert (stats.rollouts, stats.sequences, stats.tokens) == (2, 8, 32) and stats.seconds > 0


def test_tail_prompts_keep_the_rows_length():
    ids = torch.zeros(3, 16, dtype=torch.long)
    assert tail_prompts(4)(ids) == [12, 12, 12]
    with pytest.raises(ValueError, match="distill.rollout_tokens: expected fewer than the 16 tokens"):
        tail_prompts(16)(ids)


def test_no_step_samples_before_the_start():
    sched = OnPolicySchedule(0.5, start=4)
    assert [s for s in range(10) if sched(s)] == [5, 7, 9]
