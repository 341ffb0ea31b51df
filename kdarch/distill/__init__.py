"""kdarch.distill: knowledge distillation of a student from a teacher.

- `kd_loss(student_logits, teacher, labels, kind=..., temperature=..., alpha=..., beta=...)`: the loss
  convention (forward / reverse KL × T², generalised JSD(β) × T², TVD; hard CE at T = 1; α·soft + (1 − α)·hard;
  ignore_index rows excluded), see `losses.py`.
- `fused_kd_loss(hidden, head_weight, labels, teacher, ...)` / `DistillationHead`: the same loss from hidden
  states without materialising [tokens × vocab] logits, see `head.py`.
- `TopKTeacher`: a cached top-k teacher signal (ids + logits or log-probs + tail mass) with two
  temperature treatments ("tail", "renormalise"), see `teacher_signal.py`.
- `multi_token_kd_loss`: the main head and every MTP depth against the teacher's distribution for the token
  each predicts, see `mtp.py`.
- `FeatureDistiller`: projected student hidden states vs the teacher's over a layer map (MSE / cosine), see
  `features.py`; `RelationDistiller` and the RKD distance / angle and similarity-preserving losses on hidden
  states or MLA latents (`capture_mla_latents`), see `relations.py`.
- `KDSchedule` / `parse_schedule`: α and T over training (constant, linear, cosine) and the adaptive α rule,
  see `schedules.py`.
- Teachers behind one interface (`ModelTeacher`, `HFTeacher`; `CachedTeacher` over the on-disk logit cache
  `LogitCache` written by `write_logit_cache`; `load_teacher` for any path) with one vocabulary-alignment rule
  (`align_vocab`: padding rows cut, tokenizer mismatches refused), see `teachers.py`, `logit_cache.py`,
  `loading.py`, `vocab.py`.
- Teachers with another tokenizer: `CrossTokenizerTeacher` re-tokenises the student's rows and aligns positions
  by byte spans (`retokenize`, `align_text`, `align_spans`, `shared_vocab`), and `cross_tokenizer_kd_loss` with
  mode "align" (kd_loss over the shared vocabulary) or "uld" (sorted-probability L1), see `cross_tokenizer.py`.
- `inherit_from_teacher`: a kdarch student starts from its kdarch teacher's weights (blocks evenly spaced, the
  most-routed experts kept), see `inherit.py`.
"""
from kdarch.distill.cross_tokenizer import (
                                      CROSS_TOKENIZER_MODES,
                                      CrossTokenizerOutput,
                                      CrossTokenizerTeacher,
                                      CrossTokenizerTerms,
                                      Retokenized,
                                      TokenizerView,
                                      align_spans,
                                      align_text,
                                      cross_tokenizer_kd_loss,
                                      retokenize,
                                      shared_vocab,
)
from kdarch.distill.features import FeatureDistiller, FeatureKDConfig, uniform_layer_map
from kdarch.distill.head import DistillationHead, fused_kd_loss
from kdarch.distill.inherit import Inheritance, check_inheritable, inherit_from_teacher
from kdarch.distill.loading import load_teacher
from kdarch.distill.logit_cache import CachedTeacher, LogitCache, write_logit_cache
from kdarch.distill.losses import KINDS, KDLossConfig, KDTerms, kd_loss
from kdarch.distill.mtp import MultiTokenKD, multi_token_kd_loss
from kdarch.distill.relations import (
                                      RelationDistiller,
                                      RelationKDConfig,
                                      capture_mla_latents,
                                      rkd_angle_loss,
                                      rkd_distance_loss,
                                      similarity_preserving_loss,
)
from kdarch.distill.schedules import SCHEDULE_KINDS, AdaptiveAlpha, KDSchedule, Schedule, parse_schedule
from kdarch.distill.teacher_signal import MODES, TopKTeacher
from kdarch.distill.teachers import HFTeacher, ModelTeacher, Teacher, TeacherOutput
from kdarch.distill.vocab import (
                                      VocabAlignment,
                                      VocabMismatchError,
                                      align_vocab,
                                      tokenizer_fingerprint,
                                      vocab_fingerprint,
)

__all__ = ["AdaptiveAlpha", "CROSS_TOKENIZER_MODES", "CachedTeacher", "CrossTokenizerOutput", "CrossTokenizerTeacher",
           "CrossTokenizerTerms", "DistillationHead", "FeatureDistiller", "FeatureKDConfig", "HFTeacher",
           "Inheritance", "KDLossConfig", "KDSchedule", "KDTerms", "KINDS", "LogitCache", "MODES", "ModelTeacher",
           "MultiTokenKD", "RelationDistiller", "RelationKDConfig", "Retokenized", "SCHEDULE_KINDS", "Schedule",
           "Teacher", "TeacherOutput", "TokenizerView", "TopKTeacher", "VocabAlignment", "VocabMismatchError",
           "align_spans", "align_text", "align_vocab", "capture_mla_latents", "check_inheritable",
           "cross_tokenizer_kd_loss", "fused_kd_loss", "inherit_from_teacher", "kd_loss", "load_teacher",
           "multi_token_kd_loss", "parse_schedule", "retokenize", "rkd_angle_loss", "rkd_distance_loss",
           "shared_vocab", "similarity_preserving_loss", "tokenizer_fingerprint", "uniform_layer_map",
           "vocab_fingerprint", "write_logit_cache"]
