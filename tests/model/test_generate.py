import pytest
import torch

from kdarch import CausalLM, LatentKVCache, get_preset
from kdarch.model import generation
from kdarch.model.attention import choose_path, set_path
from kdarch.model.cache import StaticLatentKVCache
from kdarch.model.generation import decode_step, left_pad, sample_next
from kdarch.ops.moe import torch_backend
from kdarch.testing import no_host_syncs


def make(**changes):
    torch.manual_seed(0)
    return CausalLM(get_preset("debug", **changes)).eval()


V3_ATTENTION = dict(n_heads=16, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512)
"""DeepSeek-V3's attention shapes on the debug preset's small everything else."""


@pytest.mark.parametrize("path", ["auto", "absorbed", "expanded"])
@pytest.mark.parametrize("changes", [{}, {"q_lora_rank": 0}, {"rope_factor": 4.0, "rope_original_max_seq_len": 16},
                                     V3_ATTENTION], ids=["debug", "no-q-lora", "yarn", "v3-attention"])
def test_cached_decoding_matches_full_forward(changes, path):
    """A 7-token prefill, a 5-token chunk on top of it (queries offset in the cache), then one-token steps:
    the logits of the no-cache forward, on either attention path pinned or as chosen per call."""
    model = make(**changes)
    set_path(model, path)
    x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x).logits
        cache = LatentKVCache(model.config, 2, 20)
        steps = [model(x[:, :7], cache=cache).logits, model(x[:, 7:12], cache=cache).logits]
        for t in range(12, 20):
            steps.append(model(x[:, t:t + 1], cache=cache, position_ids=torch.tensor([t])).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=1e-4)
    cfg = model.config
    assert cache.nbytes() == 2 * 20 * cfg.kv_cache_bytes_per_token(latent=True, dtype_bytes=4)


def test_path_choice_by_shape():
    """One-token steps attend on the latent (expanding S latents costs more than attending to them); a prefill
    from an empty cache expands; set_path pins a path and refuses unknown names."""
    for cfg in (get_preset("debug"), get_preset("bench"), get_preset("bench", **V3_ATTENTION)):
        assert all(choose_path(1, S, cfg) == "absorbed" for S in (2, 7, 512, 4096, 65536))
        assert all(choose_path(S, S, cfg) == "expanded" for S in (512, 4096))
    assert choose_path(2, 4096, get_preset("bench", **V3_ATTENTION)) == "absorbed"  # a speculative check
    with pytest.raises(ValueError, match="MLA path: expected one of auto, absorbed, expanded, got 'fused'"):
        set_path(make(), "fused")


@pytest.mark.parametrize("path", ["auto", "absorbed", "expanded"])
def test_batched_prompts_of_different_lengths_match_single_runs(path):
    model = make()
    set_path(model, path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103]]
    batched = model.generate(prompts, 6)
    assert batched == [model.generate([p], 6)[0] for p in prompts]
    # the first token equals the full-forward argmax for each prompt alone
    for p, new in zip(prompts, batched):
        assert new[0] == model(torch.tensor([p])).logits[0, -1].argmax().item()
    # and greedy continuation equals repeated full forwards
    seq = list(prompts[1])
    for _ in range(6):
        seq.append(model(torch.tensor([seq])).logits[0, -1].argmax().item())
    assert batched[1] == seq[2:]


@pytest.mark.parametrize("changes", [{}, V3_ATTENTION], ids=["debug", "v3-attention"])
def test_greedy_generation_equals_transformers_generate(changes):
    """The same weights in transformers' DeepseekV3ForCausalLM: its `generate` (a cache of latents expanded to
    full heads every step) gives kdarch's greedy tokens one for one."""
    pytest.importorskip("transformers")
    from kdarch.convert.hf import to_hf_model
    torch.manual_seed(1)
    model = CausalLM(get_preset("debug", **changes)).eval()
    with torch.no_grad():  # unit-gain weights: sharper logits than the 0.02 init, fewer near-ties for rounding
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
    hf = to_hf_model(model).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    ours = model.generate(ids.tolist(), 16, eos_token_id=-1)
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False, pad_token_id=0)
    assert ours == theirs[:, 24:].tolist()
    assert len({t for r in ours for t in r}) > 3  # not a degenerate constant output


def test_attention_mask_only_with_padding():
    """No padding: no mask (causal order is the rule). With padding: query slot q sees valid slots s <= q and
    itself, compared with a mask written out by loops."""
    cfg = get_preset("debug")
    cache = LatentKVCache(cfg, 2, 8)
    cache.begin(torch.ones(2, 3, dtype=torch.bool), all_valid=True)
    assert cache.attention_mask(3) is None
    cache = LatentKVCache(cfg, 2, 8)
    valid_BT = torch.tensor([[False, False, True, True], [True, True, True, True]])
    cache.begin(valid_BT)
    cache.advance(4)
    cache.begin(torch.ones(2, 2, dtype=torch.bool), all_valid=True)  # padding stays masked after the prompt
    valid = torch.cat([valid_BT, torch.ones(2, 2, dtype=torch.bool)], 1)
    want = torch.tensor([[[(s <= q and bool(valid[b, s])) or s == q for s in range(6)] for q in (4, 5)]
                         for b in range(2)])
    got = cache.attention_mask(2)
    assert torch.equal(got[:, 0], want) and cache.attention_mask(2) is got  # built once per forward


def test_stop_token_ends_a_row():
    model = make()
    first = model.generate([[1, 2, 3]], 5)[0]
    eos = first[1]
    out = model.generate([[1, 2, 3], [9, 9]], 5, eos_token_id=eos)
    assert out[0] == first[:2]
    # the other row runs on (batched with a finished one) and stops at its own first eos, if any
    other = model.generate([[9, 9]], 5, eos_token_id=-1)[0]
    assert out[1] == (other[:other.index(eos) + 1] if eos in other else other)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits).item() == 1
    assert all(sample_next(logits, temperature=1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, temperature=5.0, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    draws = {sample_next(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    # top_p=0.7 keeps tokens 1 and 3 (their mass passes 0.7 only together)
    draws = {sample_next(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, temperature=1.0, top_p=0.0)


def test_sampling_is_reproducible_with_a_generator():
    model = make()
    a = model.generate([[1, 2]], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = model.generate([[1, 2]], 8, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert a == b


def test_generate_errors():
    model = make()
    with pytest.raises(ValueError, match="max_seq_len=128"):
        model.generate([[1] * 100], 40)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[]], 4)
    with pytest.raises(ValueError, match=r"expected token ids in \[0, 256\), got 999"):
        model.generate([[999]], 4)


# ------------------------------------------------------- the static cache: a decode step that compiles

@pytest.mark.parametrize("path", ["absorbed", "expanded"])
def test_static_cache_decodes_like_the_growing_cache_without_host_syncs(value_checks_off, path, monkeypatch):
    """All S slots attended under the mask, index_copy writes at a device-side slot: the same logits as
    the growing cache, left padding included, and a decode step that reads nothing back (the MoE's few-row
    path as a GPU runs it: on the CPU it reads the expert ids, for free)."""
    monkeypatch.setattr(torch_backend, "HOST_READ_DEVICES", ())
    model, cfg = make(), get_preset("debug")
    set_path(model, path)
    ids_BT, valid_BT, pos_BT = left_pad([[5, 6, 7, 8, 9], [40, 41]])
    steps_B = torch.tensor([[3, 250], [17, 64], [42, 5], [99, 128]])
    logits = []
    with torch.no_grad():
        for cache in (LatentKVCache(cfg, 2, 9), StaticLatentKVCache(cfg, 2, 32)):
            seen = [model(ids_BT, cache=cache, position_ids=pos_BT, valid_mask=valid_BT).logits[:, -1]]
            with no_host_syncs() if cache.static else torch.no_grad():
                for i, tok_B in enumerate(steps_B):
                    seen.append(decode_step(model, tok_B[:, None], pos_BT[:, -1:] + 1 + i, cache))
            logits.append(torch.stack(seen))
    torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="position_ids: expected .* StaticLatentKVCache"):
        model(ids_BT, cache=StaticLatentKVCache(cfg, 2, 32))


def test_compiled_generation_gives_the_same_tokens_from_one_graph(monkeypatch):
    """generate(compile=True): fullgraph, one compilation for every step and for every call of a batch size
    whose prompt and new tokens fit the same slot bucket, and the tokens of eager decoding (greedy, sampled,
    stopped)."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(generation, "compiled_decode_step",
                        lambda device_type: torch.compile(decode_step, fullgraph=True, backend=counter))
    model = make()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 101, 102, 103]]
    assert model.generate(prompts, 12, compile=True) == model.generate(prompts, 12)
    assert counter.frame_count == 1  # eleven decode steps, one graph
    sampled = dict(temperature=1.0, top_p=0.9)
    assert (model.generate(prompts[1:], 9, generator=torch.Generator().manual_seed(7), compile=True, **sampled)
            == model.generate(prompts[1:], 9, generator=torch.Generator().manual_seed(7), **sampled))
    first = model.generate([[1, 2, 3]], 5)[0]
    assert model.generate([[1, 2, 3], [9, 9]], 5, eos_token_id=first[1], compile=True)[0] == first[:2]
    assert counter.frame_count == 2  # one more for two rows, then none for other prompt and output lengths


def _trained_on_a_cycle(steps=40):
    torch.manual_seed(0)
    model = CausalLM(get_preset("debug"))
    cycle = torch.tensor([3, 17, 42, 99, 7, 250, 64, 5, 128, 31])
    x = cycle.repeat(2, 6)[:, :48]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(x, labels=x, return_logits=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), cycle


def test_mtp_speculative_decoding_equals_greedy_and_accepts_drafts():
    from kdarch.model import generate_speculative
    model, cycle = _trained_on_a_cycle()
    prompt = cycle[:4].tolist()
    spec, stats = generate_speculative(model, prompt, 20)
    assert spec == model.generate([prompt], 20)[0]
    assert stats.acceptance > 0.5 and stats.main_steps < 19
    # an untrained model: drafts mostly rejected, output still exactly greedy
    fresh = make()
    spec, stats = generate_speculative(fresh, [1, 2, 3], 12)
    assert spec == fresh.generate([[1, 2, 3]], 12)[0]
    assert stats.drafted == stats.main_steps


def test_speculative_needs_mtp():
    from kdarch.model import generate_speculative
    with pytest.raises(ValueError, match="n_mtp_modules=0"):
        generate_speculative(make(n_mtp_modules=0), [1, 2], 4)
