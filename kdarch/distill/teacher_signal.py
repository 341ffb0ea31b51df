"""Teacher signals: dense logits, or a cached top-k (ids + logits or log-probs + tail mass).

Why top-k: a teacher's full logits are too big to keep (V = 152k fp32 is 600 KB per token); its top-k
(k = 64..128) holds nearly all of the mass for ~1 KB per token. What to do with the mass outside the top-k
at a temperature T != 1 is a choice; two are offered, and both equal the dense loss exactly when k = V:

- mode="renormalise": both distributions are restricted to the teacher's k ids and renormalised there:
  p_t = softmax(v / T) over the k entries (logits and log-probs give the same), p_s = softmax(z[ids] / T).
  Works from logits alone; ignores how much mass the teacher left outside the top-k.
- mode="tail": k + 1 buckets, the last one "everything else". The teacher's buckets are its T = 1
  probabilities [p_1 .. p_k, tail] re-tempered as buckets, q ∝ b^(1/T) (the tail's inner shape is unknown,
  so it is tempered as one token). The student's buckets are its full-vocabulary probabilities at T on
  the ids plus their remainder 1 - Σ_k p_s (a masked logsumexp, never a difference). Needs log-probs
  or tail_mass. A teacher tail of exactly 0 (rounding, when the top-k holds ~all the mass) is floored at
  TAIL_FLOOR so that reverse KL / JSD stay finite.

Masked entries: a logit of -inf (a padded or masked vocabulary entry) is probability 0. Logits are floored at
`logit_floor(T)` (-finfo(float32).max / 4 · min(T, 1)) as they are read into the chunk buffers: the entry keeps
probability exactly 0 but gets a finite log-probability, so that the 0 · log 0 terms of the divergences are 0,
not NaN. The floor is the copy itself where it can be (`rows_into`), and the fused head's logits h @ W.T need
none unless W has ±inf entries (losses.py), so the hot path has no pass for it.

The functions below work on one chunk of rows in the loss's compute dtype (fp32, or fp64 when an input is
fp64), writing [C, V] results into reusable workspace buffers `ws(name, rows, cols)`. The student side
returns its bucket log-probs and probs with `back`, which turns w = p_s ⊙ dD/dp_s (per bucket) into dD/du
over the full vocabulary (u = student logits / T).

Shape legend: N rows, V vocabulary, K top-k, C rows per chunk, B buckets (V, K or K + 1).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from kdarch.checks import check, check_index_range, choice_arg, fail, value_checks_on

MODES = ("tail", "renormalise")
VALUES_ARE = ("logprobs", "logits")
TAIL_FLOOR = 1e-30
"""Smallest teacher tail mass used in mode="tail" (log = -69)."""
LOGIT_FLOOR = torch.finfo(torch.float32).min / 4
"""Logits are floored at LOGIT_FLOOR · min(T, 1): -inf becomes a finite logit of probability exactly 0."""
_ID_DTYPES = (torch.int64, torch.int32)


def logit_floor(T: float) -> float:
    """The floor for logits read at temperature T: far below any real logit, its log-probability at T stays
    finite (>= -finfo(float32).max / 4 - logsumexp) and its probability underflows to exactly 0."""
    return LOGIT_FLOOR * min(T, 1.0)


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher's top-k per row; row i belongs with row i of the student's logits / hidden states."""
    ids: torch.Tensor
    """[..., K] int64/int32 vocabulary ids, distinct within a row."""
    values: torch.Tensor
    """[..., K] float: the teacher's logits or log-probabilities (at T = 1) on those ids."""
    values_are: str = "logprobs"
    """"logprobs" or "logits" (logits: known only up to a per-row constant)."""
    tail_mass: torch.Tensor | None = None
    """[...] 1 - Σ top-k probabilities at T = 1. None: derived from log-probs (in fp64)."""
    mode: str = "tail"
    """How the mass outside the top-k is treated at T: "tail" (one extra bucket) or "renormalise"."""

    def __post_init__(self):
        choice_arg("TopKTeacher.values_are", self.values_are, VALUES_ARE)
        choice_arg("TopKTeacher.mode", self.mode, MODES)
        ids, vals, tail = self.ids, self.values, self.tail_mass
        check(isinstance(ids, torch.Tensor) and ids.dtype in _ID_DTYPES and ids.dim() >= 1 and ids.shape[-1] >= 1,
              "TopKTeacher.ids", "an int64/int32 tensor [..., K] with K >= 1", ids)
        check(isinstance(vals, torch.Tensor) and vals.is_floating_point() and vals.shape == ids.shape,
              "TopKTeacher.values", f"a float tensor shaped like ids {tuple(ids.shape)}", vals)
        check(tail is None or (isinstance(tail, torch.Tensor) and tail.is_floating_point()
                               and tail.shape == ids.shape[:-1]),
              "TopKTeacher.tail_mass", f"None or a float tensor of shape {tuple(ids.shape[:-1])}", tail)
        check(not (self.mode == "tail" and self.values_are == "logits" and tail is None), "TopKTeacher.tail_mass",
              'a tensor for mode="tail" with values_are="logits" (or log-probs as values, or mode="renormalise")',
              tail)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, *, mode: str = "tail",
                    chunk_elements: int = 1 << 24) -> TopKTeacher:
        """Top-k log-probs and the exact tail mass of dense teacher logits [..., V] (what a logit cache keeps),
        computed a chunk of rows at a time (about `chunk_elements` logits each): no [N, V] log-softmax is ever
        made, which at V = 262k and a batch of 1k tokens would be 1 GiB per copy."""
        V = logits.shape[-1]
        values, ids, tails = [], [], []
        with torch.no_grad():
            for x_CV in logits.reshape(-1, V).split(max(1, chunk_elements // V)):
                logp_CV = x_CV.float().log_softmax(-1)
                v_CK, i_CK = logp_CV.topk(k, dim=-1)
                values.append(v_CK)
                ids.append(i_CK)
                tails.append(logp_CV.scatter_(-1, i_CK, float("-inf")).logsumexp(-1).exp())
        lead = logits.shape[:-1]
        return cls(torch.cat(ids).view(*lead, k), torch.cat(values).view(*lead, k), "logprobs",
                   torch.cat(tails).view(lead), mode)

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def _derived(self, **tensors) -> TopKTeacher:
        """A copy with views / rows of its own tensors, not validated again (`dataclasses.replace` would)."""
        new = object.__new__(TopKTeacher)
        for f in dataclasses.fields(self):
            object.__setattr__(new, f.name, tensors.get(f.name, getattr(self, f.name)))
        return new

    def detach(self) -> TopKTeacher:
        tail = self.tail_mass.detach() if self.tail_mass is not None else None
        return self._derived(values=self.values.detach(), tail_mass=tail)

    def flatten(self) -> TopKTeacher:
        """The same signal with rows flattened: ids/values [N, K], tail_mass [N]."""
        tail = self.tail_mass.reshape(-1) if self.tail_mass is not None else None
        return self._derived(ids=self.ids.reshape(-1, self.k), values=self.values.reshape(-1, self.k), tail_mass=tail)

    def take(self, rows) -> TopKTeacher:
        """Rows of a flattened signal (a slice or an index tensor)."""
        pick = (lambda t: t[rows]) if isinstance(rows, slice) else (lambda t: t.index_select(0, rows))
        tail = pick(self.tail_mass) if self.tail_mass is not None else None
        return self._derived(ids=pick(self.ids), values=pick(self.values), tail_mass=tail)

    def check(self, vocab_size: int, lead_shape: tuple, who: str) -> None:
        """Checks against the student: shapes (always), and, where `value_checks_on` (one pass over [N, K]), id
        range and uniqueness, log-probs that sum to at most 1, tail mass in [0, 1]."""
        lead = tuple(lead_shape)
        check(tuple(self.ids.shape[:-1]) == lead, f"{who}: TopKTeacher.ids",
              f"a tensor of shape {lead} + (K,), one row per student row", self.ids)
        check(self.k <= vocab_size, f"{who}: TopKTeacher.k", f"an int <= the student's vocab size V={vocab_size}",
              self.k)
        if self.ids.numel() == 0 or not value_checks_on(self.ids):
            return
        check_index_range(f"{who}: TopKTeacher.ids", self.ids, vocab_size,
                          what="ids of the student's vocabulary (teacher and student vocabularies must match)")
        if self.k > 1:
            ids_NK = self.ids.reshape(-1, self.k)
            srt_NK = ids_NK.sort(-1).values
            dup_N = (srt_NK[:, 1:] == srt_NK[:, :-1]).any(-1)
            if dup_N.any():
                fail(f"{who}: TopKTeacher.ids", "distinct ids within each row", ids_NK[dup_N.nonzero()[0, 0]].tolist())
        if self.values_are == "logprobs":
            mass = float(self.values.detach().double().logsumexp(-1).exp().max())
            check(mass <= 1.01, f"{who}: TopKTeacher.values", "log-probs (values_are='logprobs') whose exp sums to "
                  "<= 1 in every row; pass logits with values_are='logits'", f"a row whose exp sums to {mass:.3g}")
        if self.tail_mass is not None:
            lo, hi = (float(v) for v in torch.aminmax(self.tail_mass.detach()))
            check(lo >= -1e-3 and hi <= 1 + 1e-3, f"{who}: TopKTeacher.tail_mass", "values in [0, 1]",
                  float(f"{lo if lo < -1e-3 else hi:.4g}"))


def uses_tail(teacher: TopKTeacher, vocab_size: int) -> bool:
    return teacher.mode == "tail" and teacher.k < vocab_size  # k = V: no tail; both modes are the dense loss


def rows_into(x_NV: torch.Tensor, rows, out_CV: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """out <- x[rows] (a slice or an index tensor), floored at `floor` if given (`logit_floor`), without a fresh
    [C, V] allocation where possible. The floor is the copy itself (torch.clamp(out=)) when x has out's dtype and
    rows is a slice; otherwise one in-place pass over out."""
    same = x_NV.dtype == out_CV.dtype
    if isinstance(rows, slice):
        if floor is not None and same:
            return torch.clamp(x_NV[rows], min=floor, out=out_CV)
        out_CV.copy_(x_NV[rows])
    elif same:
        torch.index_select(x_NV, 0, rows, out=out_CV)
    else:
        out_CV.copy_(x_NV.index_select(0, rows))
    return out_CV if floor is None else out_CV.clamp_min_(floor)


def log_softmax_(x_CV: torch.Tensor, p_CV: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """x <- log_softmax(x / T) in place and p <- softmax(x / T); returns logsumexp(x / T) [C, 1]. One exp pass,
    no log over [C, V], and the 1/T folded into passes that are needed anyway. Floored logits (`logit_floor`) give
    finite log-probs."""
    m_C1 = x_CV.amax(-1, keepdim=True) / T
    z_C1 = torch.add(-m_C1, x_CV, alpha=1 / T, out=p_CV).exp_().sum(-1, keepdim=True)
    p_CV.div_(z_C1)
    lse_C1 = z_C1.log_().add_(m_C1)
    torch.add(-lse_C1, x_CV, alpha=1 / T, out=x_CV)
    return lse_C1


def teacher_logprobs(teacher, rows, T: float, vocab_size: int, ws):
    """The teacher's log-probs and probs at T over its buckets: [C, V] (dense), [C, K] or [C, K + 1]. Log-probs
    are finite: dense logits are floored as they are read, top-k ones clamped ([C, K], cheap)."""
    if isinstance(teacher, torch.Tensor):
        C = ws.rows(rows)
        lt_CV = rows_into(teacher, rows, ws("TT", C, vocab_size), logit_floor(T))
        pt_CV = ws("Q", C, vocab_size)
        log_softmax_(lt_CV, pt_CV, T)
        return lt_CV, pt_CV
    tk = teacher.take(rows)
    v_CK = tk.values.to(ws.dtype)
    if not uses_tail(tk, vocab_size):
        lt_CB = (v_CK / T).log_softmax(-1)
    else:
        tail_C = tk.tail_mass.double() if tk.tail_mass is not None else 1 - tk.values.double().exp().sum(-1)
        tail_C = tail_C.clamp(TAIL_FLOOR, 1.0)
        if tk.values_are == "logits":  # log p = log_softmax(v) + log(1 - tail)
            v_CK = v_CK.log_softmax(-1) + (-tail_C).log1p().to(v_CK.dtype)[:, None]
        lt_CB = (torch.cat([v_CK, tail_C.log().to(v_CK.dtype)[:, None]], 1) / T).log_softmax(-1)
    lt_CB = lt_CB.clamp_min_(torch.finfo(lt_CB.dtype).min)
    return lt_CB, lt_CB.exp()


def student_logprobs(s_CV: torch.Tensor, teacher, rows, T: float, ws):
    """The student's log-probs and probs at T over the teacher's buckets, from its logits s (a workspace buffer,
    floored at `logit_floor(T)`); back(w_CB) -> dD/du [C, V] for w = p_s ⊙ dD/dp_s and u = s / T (for a plain
    softmax that is w - p_s·Σw; a bucket sums its tokens' probabilities), written outside buffer "P"; and
    lse = logsumexp(s / T) [C, 1] when s was overwritten by log_softmax(s / T) (dense and tail), None when s is
    intact (renormalise)."""
    C, V = s_CV.shape
    if isinstance(teacher, TopKTeacher):
        ids_CK = teacher.take(rows).ids.long()
        if not uses_tail(teacher, V):  # renormalise over the k ids
            ls_CK = (s_CV.gather(1, ids_CK) / T).log_softmax(-1)
            ps_CK = ls_CK.exp()

            def back(w_CK):
                g_CK = w_CK.addcmul_(ps_CK, w_CK.sum(-1, keepdim=True), value=-1)
                return ws("G", C, V).zero_().scatter_(1, ids_CK, g_CK)
            return ls_CK, ps_CK, back, None

    ls_CV, ps_CV = s_CV, ws("P", C, V)
    lse_C1 = log_softmax_(ls_CV, ps_CV, T)
    if not isinstance(teacher, TopKTeacher):
        return ls_CV, ps_CV, lambda w_CV: w_CV.addcmul_(ps_CV, w_CV.sum(-1, keepdim=True), value=-1), lse_C1

    rest_CV = ws("G", C, V).copy_(ls_CV).scatter_(1, ids_CK, float("-inf"))  # log-probs of the tail tokens
    m_C1 = rest_CV.amax(-1, keepdim=True)
    ls_tail_C1 = rest_CV.sub_(m_C1).exp_().sum(-1, keepdim=True).log_().add_(m_C1)
    ls_CB = torch.cat([ls_CV.gather(1, ids_CK), ls_tail_C1], 1)
    ps_CB = ls_CB.exp()

    def back(w_CB):
        sw_C1, ps_tail_C1 = w_CB.sum(-1, keepdim=True), ps_CB[:, -1:]
        dtail_C1 = torch.where(ps_tail_C1 > 0, w_CB[:, -1:] / ps_tail_C1, 0)  # dD/dp_tail
        g_CV = torch.mul(ps_CV, dtail_C1 - sw_C1, out=ws("G", C, V))  # tail tokens: p·(dD/dp_tail - Σw)
        return g_CV.scatter_(1, ids_CK, w_CB[:, :-1].addcmul_(ps_CB[:, :-1], sw_C1, value=-1))
    return ls_CB, ps_CB, back, lse_C1
