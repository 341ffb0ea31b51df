"""kdarch.distill: response-based knowledge distillation from a teacher's logits.

- `kd_loss(student_logits, teacher, labels, kind=..., temperature=..., alpha=..., beta=...)`: the loss
  convention (forward / reverse KL × T², generalised JSD(β) × T², TVD; hard CE at T = 1; α·soft + (1 − α)·hard;
  ignore_index rows excluded), see `losses.py`.
- `fused_kd_loss(hidden, head_weight, labels, teacher, ...)` / `DistillationHead`: the same loss from hidden
  states without materialising [tokens × vocab] logits, see `head.py`.
- `TopKTeacher`: a cached top-k teacher signal (ids + logits or log-probs + tail mass) with two
  temperature treatments ("tail", "renormalise"), see `teacher_signal.py`.
"""
from kdarch.distill.head import DistillationHead, fused_kd_loss
from kdarch.distill.losses import KINDS, KDLossConfig, KDTerms, kd_loss
from kdarch.distill.teacher_signal import MODES, TopKTeacher

__all__ = ["KINDS", "MODES", "DistillationHead", "KDLossConfig", "KDTerms", "TopKTeacher", "fused_kd_loss",
           "kd_loss"]
