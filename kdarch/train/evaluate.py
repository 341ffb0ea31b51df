"""Held-out evaluation for the report: loss, perplexity, agreement with the teacher, generation speed, memory.

The three models of a distillation report (teacher, distilled student, scratch student) are measured the same
way here, so their rows compare: next-token cross-entropy over every position of the held-out sequences
(mean over tokens, perplexity = exp of it) and the same sum in bits per byte of the text (the figure that
compares across tokenizers: a teacher of another tokenizer is scored on its own tokens of the same bytes), the
fraction of positions where the model's argmax equals the teacher's, and greedy generation throughput — a
kdarch model on its latent KV cache, a Hugging Face model through transformers' `generate` — as the median of
repeated runs, each on the model's own device (peak memory is measured in `kdarch.train.device`).
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdarch.distill.cross_tokenizer import CrossTokenizerTeacher, TokenizerView, retokenize
from kdarch.distill.teachers import Teacher

TopOneFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(indices_B, ids_BT) -> the teacher's argmax token per position [B, T]."""


def _batches(heldout_NT: torch.Tensor, batch_size: int, max_sequences: int):
    n = heldout_NT.shape[0] if not max_sequences else min(max_sequences, heldout_NT.shape[0])
    for s in range(0, n, batch_size):
        idx = torch.arange(s, min(n, s + batch_size))
        yield idx, heldout_NT[idx]


def _logits(model, ids_BT: torch.Tensor) -> torch.Tensor:
    if isinstance(model, Teacher):
        signal = model(ids_BT).signal
        if not isinstance(signal, torch.Tensor):
            raise ValueError(f"evaluate_lm: {model.name} gives top-k log-probs, not logits; it cannot be scored")
        return signal
    param = next(model.parameters(), None)
    return model(ids_BT.to(param.device) if param is not None else ids_BT).logits.cpu()


def token_bytes(tokenizer) -> torch.Tensor:
    """[V] int64: the UTF-8 bytes of each id's text (0 for special tokens and unused ids), to count a held-out
    loss per byte of text — the one loss that compares across tokenizers."""
    view = TokenizerView(tokenizer)
    return torch.tensor([len(p) if p is not None else 0 for p in view.pieces], dtype=torch.long)


def _per_byte(out: dict, nll: float, n_bytes: int) -> dict:
    if n_bytes:
        out["bits_per_byte"] = nll / n_bytes / math.log(2)
    return out


def _next_token_nll(logits_BTV: torch.Tensor, target_BT1: torch.Tensor) -> torch.Tensor:
    """[B, T - 1] CE of position j's logits against target j (0 where ignored), on the rows as they lie in memory:
    cross_entropy over a [B, V, T] transpose walks the vocabulary with stride T, several times slower."""
    B, T, V = logits_BTV.shape
    target_BT = torch.cat([target_BT1, target_BT1.new_full((B, 1), -100)], 1)  # the last position has none
    return F.cross_entropy(logits_BTV.reshape(B * T, V), target_BT.reshape(-1), reduction="none").view(B, T)[:, :-1]


@torch.no_grad()
def evaluate_lm(model, heldout_NT: torch.Tensor, *, batch_size: int = 16, max_sequences: int = 0,
                teacher_top1: TopOneFn | None = None, pad_id: int | None = None,
                token_bytes_V: torch.Tensor | None = None) -> dict[str, float]:
    """eval_loss (mean next-token CE over held-out tokens), perplexity and, with a teacher, top1_agreement;
    per_sequence holds each sequence's summed CE and target count, for the report's intervals; with
    `token_bytes_V` (`token_bytes(tokenizer)`) also bits_per_byte, the summed CE over the bytes of the target
    tokens' text, in bits. `model`: a kdarch model, or a `kdarch.distill` teacher giving dense logits (e.g. a
    Hugging Face model). `pad_id`: padding of one-document-per-row data, never a target."""
    if heldout_NT.dim() != 2 or heldout_NT.shape[0] == 0 or heldout_NT.shape[1] < 2:
        raise ValueError(f"evaluate_lm: expected held-out sequences [N >= 1, T >= 2], got {tuple(heldout_NT.shape)}")
    module = model if isinstance(model, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    seq_nll, seq_tokens, agree, n_bytes = [], [], 0, 0
    for idx, ids in _batches(heldout_NT, batch_size, max_sequences):
        logits_BTV = _logits(model, ids).float()
        target = ids[:, 1:] if pad_id is None else ids[:, 1:].masked_fill(ids[:, 1:] == pad_id, -100)
        nll_BT = _next_token_nll(logits_BTV, target)
        logits = logits_BTV[:, :-1]
        valid = target != -100
        seq_nll += nll_BT.sum(1).double().tolist()
        seq_tokens += valid.sum(1).tolist()
        if token_bytes_V is not None:
            n_bytes += int(token_bytes_V[ids[:, 1:]][valid].sum())
        if teacher_top1 is not None:
            agree += ((logits.argmax(-1) == teacher_top1(idx, ids)[:, :-1]) & valid).sum().item()
    if module is not None:
        module.train(was_training)
    count = sum(seq_tokens)
    loss = sum(seq_nll) / count
    out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "eval_tokens": count,
           "per_sequence": {"nll": seq_nll, "tokens": seq_tokens}}
    if teacher_top1 is not None:
        out["top1_agreement"] = agree / count
    return _per_byte(out, sum(seq_nll), n_bytes) if token_bytes_V is not None else out


@torch.no_grad()
def evaluate_cross_tokenizer_teacher(teacher: CrossTokenizerTeacher, heldout_NT: torch.Tensor, *,
                                     batch_size: int = 16, max_sequences: int = 0) -> dict[str, float]:
    """A teacher of another tokenizer on the same held-out text: each student row re-tokenised for it (as the
    distillation loss sees it), its next-token CE over its own tokens of the text the students predict (all but
    the row's first student token) — bits_per_byte, comparable with the students' (`evaluate_lm` with
    `token_bytes_V`), and eval_loss_own_tokens, which is not."""
    inner, bytes_V = teacher.inner, token_bytes(teacher.teacher_tokenizer)
    nll, count, n_bytes = 0.0, 0, 0
    for _, ids in _batches(heldout_NT, batch_size, max_sequences):
        retok = retokenize(ids, teacher.student, teacher.teacher_tokenizer)
        t_ids, n_B = retok.teacher_ids, retok.teacher_lengths
        logits_BUV = inner(t_ids).signal.float()
        # the targets the students predict too: text after the row's first student token (which no model is
        # asked for), within the row's real teacher tokens
        first_B = [spans[0][1] for spans in retok.student_spans]
        start_BU = torch.tensor([[sp[0] for sp in spans] + [-1] * (t_ids.shape[1] - len(spans))
                                 for spans in retok.teacher_spans])
        late_BU = start_BU[:, 1:] >= torch.tensor(first_B)[:, None]
        target = t_ids[:, 1:].masked_fill(~late_BU | (torch.arange(1, t_ids.shape[1]) >= n_B[:, None]), -100)
        nll += _next_token_nll(logits_BUV, target).double().sum().item()
        valid = target != -100
        count += int(valid.sum())
        n_bytes += int(bytes_V[t_ids[:, 1:]][valid].sum())
    return _per_byte({"eval_loss_own_tokens": nll / max(count, 1), "eval_tokens_own": count}, nll, n_bytes)


def _generator(model) -> Callable[[list[list[int]], int], object]:
    """generate(prompts, new_tokens), greedy, never stopping early: a kdarch model's latent-cache generation, or
    transformers' `generate` for a Hugging Face model (also behind a `ModelTeacher`)."""
    model = getattr(model, "model", model) if isinstance(model, Teacher) else model
    if getattr(model, "config", None) is not None and callable(getattr(model.config, "figures", None)):
        model.eval()
        return lambda prompts, n: model.generate(prompts, n, eos_token_id=-1)
    param = next(model.parameters())

    def hf_generate(prompts, n):
        ids_BT = torch.tensor(prompts, device=param.device)
        return model.generate(input_ids=ids_BT, attention_mask=torch.ones_like(ids_BT), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
    model.eval()
    return hf_generate


@torch.no_grad()
def generation_speeds(jobs: dict[str, tuple[object, list[list[int]]]], new_tokens: int = 48,
                      repeats: int = 3) -> dict[str, dict[str, float]]:
    """Greedy generation throughput of several models, each on its prompts (one length per model): new tokens
    per second over the whole batch, the median of `repeats` timed runs after a warm-up. The models take turns
    — round r times every model once — so a spell of contention on a busy machine slows every row alike
    instead of deciding one of them (measured one after another, two copies of one architecture were seen 2x
    apart). `jobs`: name -> (model, prompts); a model is a kdarch model (its latent KV cache), a Hugging Face
    causal LM or a `ModelTeacher` of either."""
    generators = {name: _generator(model) for name, (model, _) in jobs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in jobs}
    for name, generate in generators.items():
        generate([jobs[name][1][0][:4]], 2)  # warm-up
    for _ in range(repeats):
        for name, generate in generators.items():
            t0 = time.perf_counter()
            generate(jobs[name][1], new_tokens)
            seconds[name].append(time.perf_counter() - t0)
    return {name: {"generate_tokens_per_s": len(prompts) * new_tokens / statistics.median(seconds[name]),
                   "generate_batch": len(prompts), "generate_new_tokens": new_tokens, "generate_repeats": repeats}
            for name, (_, prompts) in jobs.items()}


def generation_speed(model, prompts: list[list[int]], new_tokens: int = 48, repeats: int = 3) -> dict[str, float]:
    """`generation_speeds` of one model."""
    return generation_speeds({"model": (model, prompts)}, new_tokens, repeats)["model"]


@torch.no_grad()
def speculative_speed(model, prompts: list[list[int]], new_tokens: int = 48, repeats: int = 3) -> dict[str, float]:
    """MTP self-speculative greedy decoding (`kdarch.model.generate_speculative`) beside plain greedy decoding on
    the same prompts, one prompt at a time (as speculative decoding runs): the drafts' acceptance, both
    tokens/s (each the median of `repeats` passes over the prompts, the two alternating) and their ratio. Empty
    for a model without MTP modules. Both give the same tokens (checked: a mismatch is an error)."""
    from kdarch.model import generate_speculative
    if not getattr(model, "mtp", None):
        return {}
    model.eval()
    drafted = accepted = 0
    greedy_s, spec_s = [], []
    for r in range(repeats + 1):  # pass 0 warms up both
        t_greedy = t_spec = 0.0
        for p in prompts:
            t0 = time.perf_counter()
            plain = model.generate([p], new_tokens, eos_token_id=-1)[0]
            t1 = time.perf_counter()
            drafted_ids, stats = generate_speculative(model, p, new_tokens, eos_token_id=-1)
            t2 = time.perf_counter()
            if list(drafted_ids) != list(plain):
                raise RuntimeError("speculative_speed: MTP-drafted decoding gave other tokens than greedy decoding")
            t_greedy, t_spec = t_greedy + t1 - t0, t_spec + t2 - t1
            if r == 0:
                drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        if r:
            greedy_s.append(t_greedy)
            spec_s.append(t_spec)
    n = len(prompts) * new_tokens
    greedy, spec = n / statistics.median(greedy_s), n / statistics.median(spec_s)
    return {"mtp_acceptance": accepted / max(drafted, 1), "speculative_tokens_per_s": spec,
            "greedy_batch1_tokens_per_s": greedy, "speculative_speedup": spec / greedy}
