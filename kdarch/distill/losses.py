"""Response-based distillation losses: one convention, computed chunk by chunk with hand-written gradients.

The convention (p_t = teacher, p_s = student, both softmax(logits / T); means over valid tokens):

    forward_kl  T² · KL(p_t ‖ p_s)   = T² Σ p_t (log p_t − log p_s)      (mode-covering; Hinton 2015)
    reverse_kl  T² · KL(p_s ‖ p_t)   = T² Σ p_s (log p_s − log p_t)      (mode-seeking)
    jsd         T² · JSD_β, m = β·p_t + (1 − β)·p_s,
                JSD_β = β·KL(p_t ‖ m) + (1 − β)·KL(p_s ‖ m)            (TRL GKD's generalised JSD)
                with JSD_0 := KL(p_t ‖ p_s) and JSD_1 := KL(p_s ‖ p_t) at the ends. Inside (0, 1) JSD_β tends to
                0 at both ends, as β·KL(p_t ‖ p_s) and (1 − β)·KL(p_s ‖ p_t): the ends are the limits of
                JSD_β / β and JSD_β / (1 − β), i.e. the same divergences up to the vanishing weight.
    tvd         ½ Σ |p_t − p_s|, NOT scaled by T²: a bounded distance whose logit gradient decays like 1/T,
                not 1/T²; T² would inflate it at T > 1. (Multiply by T yourself for a Hinton-style balance.)
    hard        cross-entropy of the student at T = 1 against the labels.
    total       α · soft + (1 − α) · hard.

T² keeps the soft term's gradient magnitude independent of T (its gradient w.r.t. the logits scales as
1/T²). TRL and Liger leave JSD unscaled; multiply their numbers by T² to compare. Rows whose label is
ignore_index count in neither term; the loss is 0 (not NaN) if none is valid. Without labels every row is
valid and α must be 1. The teacher never receives a gradient.

A logit of −inf (a masked or padded vocabulary entry) is probability 0, on either side, with 0·log 0 = 0:
logits are floored at `logit_floor(T)` as they are read into the chunk buffers (teacher_signal.py), so they
have probability exactly 0 and a finite log-probability. Entries masked on both sides therefore contribute
nothing, to the loss or its gradients (which are 0 there): the loss is the one on the vocabulary without them.
An entry one side masks while the other gives it mass makes the divergence that weighs it by that mass explode
(forward KL for a student −inf, reverse KL for a teacher −inf) to ≳ 1e37·p, as it must; it is never dropped.
Student and teacher vocabularies must match: slice a padded one (e.g. 152,064 vs 151,936) to the shared
tokenizer vocabulary. A top-k teacher is a `TopKTeacher` (teacher_signal.py).

Why chunked and hand-written: the unfused loss keeps several [N, V] fp32 tensors (log-probs of both sides,
probabilities, the gradient) and on the CPU every fresh large tensor also costs page faults. Here rows go
through in chunks, each chunk's gradient w.r.t. the student logits is computed right away (as in
`kdarch.ops.linear_ce`) into a few reused [C, V] buffers, and backward only scales the kept gradients.
The same driver serves `kd_loss` (logits given) and the fused head (`head.py`: logits = h @ W.T per
chunk, never [N, V]; a head weight with ±inf entries, the only way h @ W.T masks an entry, is found once per
call, in the host sync that plans the chunks, and then the chunk logits are floored and dL/dh reads W with
those entries zeroed).
For a divergence D over buckets b with w = p_s ⊙ ∂D/∂p_s:
    forward_kl  w = −p_t          reverse_kl  w = p_s (log p_s − log p_t)
    jsd         w = (1 − β) p_s (log p_s − log m)          tvd  w = ½ p_s sign(p_s − p_t)
and the softmax turns it into ∂D/∂u = w − p_s Σw (u = logits / T; ∂/∂logits = ∂/∂u / T).

Shape legend: N rows (tokens), V vocabulary, D hidden width, K top-k, C rows per chunk, B buckets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdarch.checks import (
    check,
    check_index_range,
    choice_arg,
    fail,
    int_arg,
    is_int,
    number_arg,
    tensor_arg,
    value_checks_on,
)
from kdarch.distill.teacher_signal import TopKTeacher, logit_floor, rows_into, student_logprobs, teacher_logprobs

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd")


@dataclass(frozen=True)
class KDLossConfig:
    """What to compute; validated on construction."""
    kind: str = "forward_kl"
    """Soft-label divergence: one of KINDS."""
    temperature: float = 1.0
    """T > 0 for the soft labels (the hard CE is always at T = 1)."""
    alpha: float = 0.5
    """Weight of the soft term in [0, 1]; the hard term gets 1 − alpha."""
    beta: float = 0.5
    """JSD interpolation in [0, 1] (0: forward KL, 1: reverse KL); used only by kind="jsd"."""
    ignore_index: int = -100
    """Label of rows that count in neither term."""

    def __post_init__(self):
        choice_arg("KDLossConfig.kind", self.kind, KINDS)
        number_arg("KDLossConfig.temperature", self.temperature, min=0, min_open=True)
        number_arg("KDLossConfig.alpha", self.alpha, min=0, max=1)
        number_arg("KDLossConfig.beta", self.beta, min=0, max=1)
        int_arg("KDLossConfig.ignore_index", self.ignore_index)

    @property
    def soft_scale(self) -> float:
        return 1.0 if self.kind == "tvd" else float(self.temperature) ** 2

    @property
    def divergence(self) -> str:
        """The kind actually computed (JSD at β = 0 / 1 is forward / reverse KL)."""
        if self.kind == "jsd" and self.beta in (0, 1):
            return "forward_kl" if self.beta == 0 else "reverse_kl"
        return self.kind


@dataclass
class KDTerms:
    """The loss and its parts for logging. Only `total` carries gradients."""
    total: torch.Tensor
    soft: torch.Tensor | None
    """soft_scale · mean divergence over valid tokens (None when not computed)."""
    hard: torch.Tensor | None
    """Mean hard-label CE at T = 1 over valid tokens (None without labels)."""
    n_tokens: int | torch.Tensor
    """Valid tokens the means ran over (a 0-dim tensor when labels mark some as ignored: counting them on the
    host would be a sync)."""


# ----------------------------------------------------------------------------------------------- math
def _rowdot(a_CB: torch.Tensor, b_CB: torch.Tensor) -> torch.Tensor:
    """Σ_b a·b per row without a [C, B] temporary."""
    return torch.bmm(a_CB.unsqueeze(1), b_CB.unsqueeze(2)).view(-1)


def _divergence(kind: str, beta: float, ls_CB, ps_CB, lt_CB, pt_CB, scratch, want_w: bool):
    """Per-row D(p_t, p_s) over buckets and, with want_w, w = p_s ⊙ ∂D/∂p_s [C, B]. Log-probs are finite;
    ls and ps are kept, lt, pt and scratch() may be overwritten (w lives in one of them)."""
    if kind == "forward_kl":
        d_C = _rowdot(pt_CB, lt_CB) - _rowdot(pt_CB, ls_CB)
        return d_C, (pt_CB.neg_() if want_w else None)
    if kind == "reverse_kl":
        d_C = _rowdot(ps_CB, ls_CB) - _rowdot(ps_CB, lt_CB)
        return d_C, (torch.sub(ls_CB, lt_CB, out=lt_CB).mul_(ps_CB) if want_w else None)
    if kind == "tvd":
        diff_CB = torch.sub(ps_CB, pt_CB, out=pt_CB)
        d_C = 0.5 * torch.linalg.vector_norm(diff_CB, 1, dim=-1)
        return d_C, (diff_CB.sign_().mul_(ps_CB).mul_(0.5) if want_w else None)
    lm_CB = torch.add(ls_CB, math.log((1 - beta) / beta), out=scratch())  # log m = log(β p_t + (1 − β) p_s)
    torch.logaddexp(lt_CB, lm_CB, out=lm_CB).add_(math.log(beta))
    d_C = beta * (_rowdot(pt_CB, lt_CB) - _rowdot(pt_CB, lm_CB)) + \
        (1 - beta) * (_rowdot(ps_CB, ls_CB) - _rowdot(ps_CB, lm_CB))
    return d_C, (torch.sub(ls_CB, lm_CB, out=lm_CB).mul_(ps_CB).mul_(1 - beta) if want_w else None)


class _Workspace:
    """Named [C, cols] buffers allocated once per call and reused by every chunk: a fresh [C, V] tensor per
    op costs page faults on the CPU (large blocks go back to the OS on free)."""

    def __init__(self, chunk: int, dtype: torch.dtype, device: torch.device):
        self.chunk, self.dtype, self.device, self.bufs = chunk, dtype, device, {}

    def __call__(self, name: str, rows: int, cols: int) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < self.chunk * cols:
            buf = self.bufs[name] = torch.empty(self.chunk * cols, dtype=self.dtype, device=self.device)
        return buf[:rows * cols].view(rows, cols)

    @staticmethod
    def rows(rows) -> int:
        return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def _chunk(s_CV, teacher, rows, y_C, cfg: KDLossConfig, ws, a: float, b: float, need_soft: bool, need_hard: bool):
    """Row losses (soft divergence, hard CE) of one chunk of student logits s [C, V] (a workspace buffer,
    overwritten) and, if a or b != 0, g = d(a·Σ soft + b·Σ hard)/ds [C, V] (a workspace buffer), or None.
    Buffers: S (s), P (student probs), TT and Q (teacher), M (JSD), G (top-k): 4 for a dense KL."""
    T, (C, V) = cfg.temperature, s_CV.shape
    soft = hard = g_CV = lse_C1 = None
    y_C1 = y_C.long()[:, None] if y_C is not None else None
    share = need_soft and T == 1 and isinstance(teacher, torch.Tensor)  # hard CE from the soft term's softmax
    if need_hard and not share:  # logsumexp(s) at T = 1, with P as scratch before the student's softmax
        m_C1 = s_CV.amax(-1, keepdim=True)
        lse1_C1 = torch.sub(s_CV, m_C1, out=ws("P", C, V)).exp_().sum(-1, keepdim=True).log_().add_(m_C1)
        hard = (lse1_C1 - s_CV.gather(1, y_C1)).squeeze(1)
    if need_soft:
        ls_CB, ps_CB, back, lse_C1 = student_logprobs(s_CV, teacher, rows, T, ws)
        lt_CB, pt_CB = teacher_logprobs(teacher, rows, T, V, ws)
        scratch = (lambda: ws("M", C, V)) if isinstance(teacher, torch.Tensor) else (lambda: torch.empty_like(ls_CB))
        soft, w_CB = _divergence(cfg.divergence, cfg.beta, ls_CB, ps_CB, lt_CB, pt_CB, scratch, a != 0)
        if share and need_hard:
            hard = -ls_CB.gather(1, y_C1).squeeze(1)
        if w_CB is not None:
            g_CV = back(w_CB).mul_(a / T)
    if need_hard and b:  # + b·(softmax(s) − onehot(y)), softmax(s) rebuilt into P (free again by now)
        if share:
            p1_CV = ps_CB
        elif lse_C1 is None:  # s intact
            p1_CV = torch.sub(s_CV, lse1_C1, out=ws("P", C, V)).exp_()
        else:  # s holds log_softmax(s / T) = s / T − lse
            p1_CV = torch.add(T * lse_C1 - lse1_C1, s_CV, alpha=T, out=ws("P", C, V)).exp_()
        g_CV = p1_CV.mul_(b) if g_CV is None else g_CV.add_(p1_CV, alpha=b)
        g_CV.scatter_add_(1, y_C1, g_CV.new_full((C, 1), -b))
    return soft, hard, g_CV


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk: [C, V] fp32 buffers of ~32 MiB, but at least 256 rows: the head's GEMMs re-pack W
    ([V, D]) for every chunk (at V = 131072 on this CPU a step takes ~12% longer with 128 rows than with 256)."""
    return max(256, 2**23 // vocab_size)


def weight_is_finite(w_VD: torch.Tensor) -> bool:
    """Whether the head weight has no ±inf / NaN entry (such rows mask vocabulary entries of h @ W.T; see the
    module docstring). It reads W back, so it is asked only where value checks are on (`kdarch.checks`): on
    the CPU by default and under KDARCH_CHECKS=1; elsewhere the weight is taken as finite."""
    if not value_checks_on(w_VD):
        return True
    lo, hi = torch.aminmax(w_VD)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _chunks(n_rows: int, chunk: int) -> list[slice]:
    """Every row, in chunks: ignored rows are computed and masked out, so no plan depends on the labels' values
    (a host sync) and every shape is fixed (what torch.compile and CUDA graphs want)."""
    return [slice(i, min(i + chunk, n_rows)) for i in range(0, n_rows, chunk)]


def _run(x, w_VD, labels_N, teacher, cfg: KDLossConfig, chunk: int, want_gx: bool, want_gw: bool,
         need_soft: bool, need_hard: bool, w_finite: bool = True):
    """Mean soft and hard terms over the valid rows (label != ignore_index), with gradients of the total w.r.t.
    x and W, and the number of valid rows (a 0-dim tensor with labels, else an int).
    x is the student's logits [N, V] (w_VD None) or its hidden states [N, D] (logits = x @ w_VD.T); w_finite
    False: W has ±inf entries (masked vocabulary rows), so the logits are floored and dL/dx reads W with them 0."""
    N = x.shape[0]
    V = x.shape[1] if w_VD is None else w_VD.shape[0]
    dts = [x.dtype] + ([w_VD.dtype] if w_VD is not None else []) + \
        [teacher.dtype if isinstance(teacher, torch.Tensor) else teacher.values.dtype]
    cdt = torch.float64 if torch.float64 in dts else torch.float32
    ws = _Workspace(min(chunk, max(N, 1)), cdt, x.device)
    valid_N = labels_N != cfg.ignore_index if labels_N is not None else None
    n = valid_N.sum() if valid_N is not None else N
    inv_n = 1.0 / n.clamp_min(1).to(cdt) if valid_N is not None else 1.0 / max(N, 1)
    a = cfg.alpha * cfg.soft_scale if want_gx or want_gw else 0.0  # per-row weights, times valid / n below
    b = (1 - cfg.alpha) if (want_gx or want_gw) and need_hard else 0.0
    gx = (torch.empty_like(x) if (a or b) else torch.zeros_like(x)) if want_gx else None
    gw = None  # the first chunk writes it (no zero-fill pass over [V, D])
    floor = logit_floor(cfg.temperature)
    w_gx = w_VD if w_finite or not want_gx else torch.where(torch.isinf(w_VD), 0, w_VD)  # 0 · inf = 0 in dL/dx
    soft_sum = torch.zeros((), dtype=cdt, device=x.device)
    hard_sum = torch.zeros((), dtype=cdt, device=x.device)
    for rows in _chunks(N, chunk):
        C = rows.stop - rows.start
        s_CV = ws("S", C, V)
        if w_VD is None:
            rows_into(x, rows, s_CV, floor)
        else:
            x_CD = x[rows]
            if x.dtype == cdt and w_VD.dtype == cdt:
                torch.mm(x_CD, w_VD.T, out=s_CV)
            else:
                s_CV.copy_(x_CD @ w_VD.T)
            if not w_finite:
                s_CV.clamp_min_(floor)
        valid_C = valid_N[rows] if valid_N is not None else None
        y_C = None if labels_N is None else torch.where(valid_C, labels_N[rows], 0)  # any id on ignored rows
        soft, hard, g_CV = _chunk(s_CV, teacher, rows, y_C, cfg, ws, a, b, need_soft, need_hard)
        # ignored rows are selected out (not multiplied by 0: whatever they hold, NaN included, never leaks)
        if soft is not None:
            soft_sum += (torch.where(valid_C, soft, 0) if valid_C is not None else soft).sum()
        if hard is not None:
            hard_sum += (torch.where(valid_C, hard, 0) if valid_C is not None else hard).sum()
        if g_CV is None:
            continue
        if valid_C is not None:
            g_CV.masked_fill_(~valid_C[:, None], 0)
        g_CV.mul_(inv_n)
        if w_VD is None:
            g_rows = g_CV
        else:
            if want_gw:
                gw = torch.mm(g_CV.T, x_CD.to(cdt)) if gw is None else gw.addmm_(g_CV.T, x_CD.to(cdt))
            g_rows = (g_CV.to(w_VD.dtype) @ w_gx) if want_gx else None
        if want_gx:
            gx[rows] = g_rows
    if want_gw and gw is None:
        gw = torch.zeros(w_VD.shape, dtype=cdt, device=x.device)
    soft = soft_sum * (cfg.soft_scale * inv_n)
    hard = hard_sum * inv_n
    total = cfg.alpha * soft + (1 - cfg.alpha) * hard if need_hard else cfg.alpha * soft
    return total, soft, hard, gx, gw, n


class _ChunkedKD(torch.autograd.Function):
    """Gradients are computed in forward (chunk by chunk) and kept; backward scales them."""

    @staticmethod
    def forward(ctx, x, w_VD, labels_N, teacher, cfg, chunk, need_soft, need_hard, w_finite):
        want_gw = w_VD is not None and ctx.needs_input_grad[1]
        total, soft, hard, gx, gw, n = _run(x, w_VD, labels_N, teacher, cfg, chunk, ctx.needs_input_grad[0],
                                            want_gw, need_soft, need_hard, w_finite)
        ctx.save_for_backward(gx, gw)
        ctx.w_dtype = w_VD.dtype if w_VD is not None else None
        ctx.mark_non_differentiable(soft, hard)
        return total, soft, hard

    @staticmethod
    def backward(ctx, grad_total, _soft, _hard):
        gx, gw = ctx.saved_tensors
        gx = gx * grad_total.to(gx.dtype) if gx is not None else None
        gw = (gw * grad_total).to(ctx.w_dtype) if gw is not None else None
        return gx, gw, None, None, None, None, None, None, None


def compute(x, w_VD, labels_N, teacher, cfg: KDLossConfig, chunk: int | None, return_terms: bool,
            w_finite: bool | None = None):
    """Shared entry of kd_loss and the fused head, on validated, flattened inputs (w_finite: a known
    `weight_is_finite(w_VD)`, asked here when None)."""
    V = x.shape[1] if w_VD is None else w_VD.shape[0]
    chunk = chunk or default_chunk(V)
    if w_finite is None:
        w_finite = w_VD is None or weight_is_finite(w_VD)
    need_soft = cfg.alpha > 0 or return_terms
    need_hard = labels_N is not None and (cfg.alpha < 1 or return_terms)
    teacher = teacher.detach()
    if torch.is_grad_enabled() and (x.requires_grad or (w_VD is not None and w_VD.requires_grad)):
        total, soft, hard = _ChunkedKD.apply(x, w_VD, labels_N, teacher, cfg, chunk, need_soft, need_hard, w_finite)
        n = labels_N.ne(cfg.ignore_index).sum() if labels_N is not None else x.shape[0]
    else:
        total, soft, hard, _, _, n = _run(x, w_VD, labels_N, teacher, cfg, chunk, False, False, need_soft,
                                          need_hard, w_finite)
    if not return_terms:
        return total
    return KDTerms(total, soft if need_soft else None, hard if need_hard else None, n)


# ------------------------------------------------------------------------------------------ validation
def check_chunk(who: str, chunk) -> None:
    check(chunk is None or (is_int(chunk) and chunk >= 1), f"{who}: chunk", "an int >= 1 or None", chunk)


def check_teacher_and_labels(who: str, lead_shape: tuple, V: int, device, teacher, labels, cfg: KDLossConfig):
    """Teacher [..., V] logits or a TopKTeacher, labels [...] ints in [0, V) or ignore_index (the range only where
    `value_checks_on`); returns them flattened to rows."""
    lead = tuple(lead_shape)
    if isinstance(teacher, TopKTeacher):
        teacher.check(V, lead, who)
        check(teacher.ids.device == device and teacher.values.device == device, f"{who}: teacher",
              f"a TopKTeacher on the student's device ({device})", teacher.values.device)
        teacher = teacher.flatten()
    elif isinstance(teacher, torch.Tensor):
        check(teacher.is_floating_point(), f"{who}: teacher", "float logits [..., V] or a TopKTeacher", teacher)
        if teacher.dim() >= 1 and tuple(teacher.shape[:-1]) == lead and teacher.shape[-1] != V:
            fail(f"{who}: teacher", f"logits over the student's vocabulary, V={V} (vocab size mismatch; if one is "
                 f"padded, slice both to the shared tokenizer vocab, e.g. teacher_logits[..., :{V}])", teacher)
        check(tuple(teacher.shape) == lead + (V,), f"{who}: teacher",
              f"logits of shape {lead + (V,)} like the student's", teacher)
        check(teacher.device == device, f"{who}: teacher", f"a tensor on the student's device ({device})",
              teacher.device)
        teacher = teacher.reshape(-1, V)
    else:
        fail(f"{who}: teacher", "a logits tensor [..., V] or a TopKTeacher", teacher, error=TypeError)
    if labels is None:
        check(cfg.alpha == 1, f"{who}: labels", f"a labels tensor (the hard-label term, alpha={cfg.alpha} < 1, "
              f"needs labels; or pass alpha=1)", None)
        return teacher, None
    tensor_arg(f"{who}: labels", labels, dtypes=(torch.int64, torch.int32), shape=lead,
               what=f"an int64/int32 tensor of shape {lead}")
    check(labels.device == device, f"{who}: labels", f"a tensor on the student's device ({device})", labels.device)
    labels = labels.reshape(-1)
    check_index_range(f"{who}: labels", labels, V, ignore=cfg.ignore_index, what="token ids")
    return teacher, labels


def kd_loss(student_logits: torch.Tensor, teacher_logits, labels: torch.Tensor | None = None, *,
            kind: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5, beta: float = 0.5,
            ignore_index: int = -100, chunk: int | None = None, return_terms: bool = False):
    """α · soft + (1 − α) · hard on student logits [..., V] (see the module docstring for the convention).

    teacher_logits: [..., V] float (detached inside) or a `TopKTeacher` ([..., K]). labels: [...] int with
    ignore_index rows excluded, or None (every row counts; needs alpha=1). `chunk` rows are processed at a
    time (default: `default_chunk(V)`). Returns the scalar loss (fp32; fp64 for fp64 inputs)
    or, with return_terms, a KDTerms(total, soft, hard, n_tokens). First-order gradients only."""
    cfg = KDLossConfig(kind, temperature, alpha, beta, ignore_index)
    check(isinstance(student_logits, torch.Tensor) and student_logits.is_floating_point()
          and student_logits.dim() >= 1 and student_logits.shape[-1] >= 1, "kd_loss: student_logits",
          "a float tensor [..., V] with V >= 1", student_logits)
    check_chunk("kd_loss", chunk)
    V = student_logits.shape[-1]
    teacher, labels_N = check_teacher_and_labels("kd_loss", student_logits.shape[:-1], V, student_logits.device,
                                                 teacher_logits, labels, cfg)
    return compute(student_logits.reshape(-1, V), None, labels_N, teacher, cfg, chunk, return_terms)
