"""The objectives of the train script: what one micro-batch's loss is, for language modelling and distillation.

A step's loss is the mean of each term over the whole step, whatever the step is cut into (micro-batches, data
ranks): every term is divided by its own count over the step, never by the main head's alone. `prepare` gives a
micro-batch its labels (and its samples, on an on-policy step) and its `target_counts` (rows, main-head targets,
each MTP depth's targets); the loop sums those over the step's micro-batches and data ranks into
`MicroBatch.step_counts_C` before any loss; a term's mean over the micro-batch times its share of that count
(`shares`) is its part of the step's mean. Rows of different lengths (padding, -100 labels, rollouts that end
early) then give the full batch's loss on any plan. Per-sequence terms (the balance loss, feature and relation KD,
which are means over the micro-batch's rows or all their positions) take the rows' share. Relation KD over samples
compares the rows of one micro-batch with each other, so it depends on how the step is cut whatever the weights.

An objective never reads a value back from the device: its loss and metrics stay tensors, so a training step
(forward, loss, backward) runs without a host sync; the loop reads them once per step (the finiteness check)
and at logging steps. The one exception is an adaptive α, which needs this step's soft divergence on the host
to pick the next step's α.

The distillation objective: one teacher pass, one student pass, every configured loss.

Per micro-batch: the teacher's signal for the batch (dense logits, its top-k, or cache rows), then the
student's hidden states only — no [tokens x vocab] student logits — through the fused head for the main
head and each MTP depth (`multi_token_kd_loss`, α·soft + (1 − α)·hard with α and T from the schedule), plus
optional feature KD (learned projectors, trained and checkpointed with the student) and relation KD (on the
last hidden states or, with `distill.relation_source = "mla"`, on the MLA latents the KV cache stores, captured
from both models by forward hooks), plus the model's own balance loss. A NaN/inf in the teacher's signal
makes the loss non-finite, and the loop skips that step. Under pipeline parallelism (`pipeline_head`) the teacher
runs on the rank of the last stage and the same KD loss of the main head and the MTP depths is the schedule's loss
function; feature and relation KD, which need every stage's hidden states, are refused there.

On-policy steps (`distill.on_policy` = λ > 0, `kdarch.distill.on_policy`): the batch's rows are cut to prompts and
continued by the student's own samples first (each row by its own generator, seeded by the step and the row's index,
so that they do not depend on the plan); everything above then runs on the sampled rows, with the loss on
the sampled tokens only and no hard term (α = 1). Their target count is known only after sampling: the loop samples
every micro-batch of the step (`prepare`) before the first loss.

A teacher with another tokenizer (`CrossTokenizerTeacher`, `distill.cross_tokenizer = "align" | "uld"`) grades the
student's rows re-tokenised into its own: the main head's loss is `cross_tokenizer_kd_loss` on materialised
student logits (the two vocabularies share no head for the fused path), and the MTP heads learn the hard labels
(the model's own MTP loss, depth by depth); feature and relation KD need one tokenization and are refused. Its KD
loss is a mean over the student's targets (or their aligned part) and takes the main head's share.

Shape legend: B rows, T positions, D width, V vocabulary, C counts (rows, main head, MTP depths 1..).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from kdarch.checks import ConfigError
from kdarch.distill.cross_tokenizer import CrossTokenizerTeacher, cross_tokenizer_kd_loss
from kdarch.distill.features import FeatureDistiller
from kdarch.distill.mtp import multi_token_kd_loss, target_counts
from kdarch.distill.on_policy import OnPolicySchedule, RolloutStats, rollout, tail_prompts
from kdarch.distill.relations import RelationDistiller, capture_mla_latents, mla_latent_norms
from kdarch.distill.schedules import KDSchedule
from kdarch.distill.teacher_signal import TopKTeacher
from kdarch.distill.teachers import ModelTeacher, Teacher
from kdarch.train.config import DistillSection


def shares(counts_C: torch.Tensor, step_counts_C: torch.Tensor | None) -> torch.Tensor:
    """[C] a part's share of each of the step's counts (all ones for a part that is the whole step)."""
    if step_counts_C is None:
        return torch.ones(counts_C.shape, device=counts_C.device)
    return counts_C / step_counts_C.clamp_min(1)


@dataclass
class MicroBatch:
    """A micro-batch ready for its loss (`prepare`): the rows it trains on, their labels and counts, and the step's."""
    indices_B: torch.Tensor | None
    """The rows' indices in the training set (seeding their rollouts)."""
    ids_BT: torch.Tensor
    """The rows (on an on-policy step: prompts and the student's samples)."""
    labels_BT: torch.Tensor
    counts_C: torch.Tensor
    """`target_counts` of these rows: rows, main-head targets, MTP depth 1.. targets."""
    step_counts_C: torch.Tensor | None = None
    """counts_C summed over every micro-batch of the step on every data rank (set by the loop); None: this micro-batch
    is the whole step."""
    sampled: bool = False
    """On-policy: the rows are the student's samples."""

    def shares(self) -> torch.Tensor:
        return shares(self.counts_C, self.step_counts_C)


@dataclass
class StepLoss:
    loss: torch.Tensor
    """Scalar to minimise: this micro-batch's part of the step's loss (each term's mean here times its share of the
    step's count, `MicroBatch.shares`); the mean over its own targets when it is the whole step."""
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    """Values to log, this micro-batch's parts of the step's values like the loss, as detached 0-dim tensors (read
    from the device only at logging steps); the loop sums them over micro-batches and data ranks."""


class Objective(Protocol):
    modules: dict[str, nn.Module]
    """Extra trainable modules (e.g. feature-KD projectors): optimised and checkpointed with the model."""

    def prepare(self, model: nn.Module, indices_B: torch.Tensor, ids_BT: torch.Tensor,
                progress: float) -> MicroBatch: ...

    def __call__(self, model: nn.Module, indices_B: torch.Tensor, ids_BT: torch.Tensor | MicroBatch,
                 progress: float) -> StepLoss: ...

    def target_tokens(self, ids_BT: torch.Tensor) -> int: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def labels_for(ids_BT: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """The labels of a batch (HF convention: the ids, shifted inside the model), padding ignored (-100)."""
    return ids_BT if pad_id is None else ids_BT.masked_fill(ids_BT == pad_id, -100)


def count_targets(ids_BT: torch.Tensor, pad_id: int | None) -> int:
    """Next-token targets of a batch: every position but the first, minus padding."""
    return int((labels_for(ids_BT, pad_id)[:, 1:] != -100).sum())


def n_depths(model: nn.Module) -> int:
    return len(getattr(model, "mtp", None) or ())


def _prepared(objective, model, indices_B, ids_BT, progress) -> MicroBatch:
    """A MicroBatch from the loop as it is; plain rows prepared here, as a step of their own."""
    return ids_BT if isinstance(ids_BT, MicroBatch) else objective.prepare(model, indices_B, ids_BT, progress)


class LMObjective:
    """Next-token cross-entropy + the model's MTP and balance losses (training a teacher or a scratch student).
    pad_id: a token id that only pads rows (one document per row) and is never a target."""
    modules: dict[str, nn.Module] = {}

    def __init__(self, pad_id: int | None = None):
        self.pad_id = pad_id

    def prepare(self, model, indices_B, ids_BT, progress) -> MicroBatch:
        labels_BT = labels_for(ids_BT, self.pad_id)
        return MicroBatch(indices_B, ids_BT, labels_BT, target_counts(labels_BT, n_depths(model)))

    def __call__(self, model, indices_B, ids_BT, progress):
        """The model's loss (lm + λ · mean_k mtp_k + balance), each term by its share of the step's count."""
        b = _prepared(self, model, indices_B, ids_BT, progress)
        out = model(b.ids_BT, labels=b.labels_BT, return_logits=False)
        s_C = b.shares()
        loss = out.lm_loss * s_C[1]
        metrics = {"lm_loss": loss.detach()}
        if out.mtp_losses:
            mtp = sum(m * s for m, s in zip(out.mtp_losses, s_C[2:])) / len(out.mtp_losses)
            loss = loss + model.config.mtp_loss_weight * mtp
            metrics["mtp_loss"] = mtp.detach()
        if out.balance_loss is not None:
            loss = loss + out.balance_loss * s_C[0]
        return StepLoss(loss, metrics)

    def target_tokens(self, ids_BT):
        return count_targets(ids_BT, self.pad_id)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class DistillObjective:
    """Loss of a student against `teacher` (a kdarch.distill Teacher, aligned to the student's vocabulary)."""

    def __init__(self, teacher: Teacher, student: nn.Module, cfg: DistillSection, total_steps: int, *,
                 pad_id: int | None = None, prompt_lengths: Callable[[torch.Tensor], list[int]] | None = None,
                 eos_token_id: int | None = None, seed: int = 0, inherited: bool = False):
        """`prompt_lengths(ids_BT)` gives each row's prompt on an on-policy step (default: all but the row's last
        `distill.rollout_tokens`); `eos_token_id` ends a rollout (default: the student's); `seed` seeds them.
        `inherited`: the student started from its teacher's weights (what `distill.alpha = "auto"` goes by)."""
        self.teacher, self.cfg, self.total_steps, self.pad_id = teacher, cfg, total_steps, pad_id
        self.schedule = KDSchedule(alpha=cfg.alpha_schedule(inherited), temperature=cfg.temperature)
        self.on_policy = OnPolicySchedule(cfg.on_policy, start=round(cfg.on_policy_start * total_steps))
        self.cross = isinstance(teacher, CrossTokenizerTeacher)
        if self.cross and (cfg.feature_weight > 0 or cfg.relation_weight > 0):
            raise ValueError("distill.feature_weight / relation_weight: expected 0 with a teacher of another tokenizer "
                             "(their hidden states are on other positions)")
        if cfg.on_policy > 0 and not isinstance(teacher, ModelTeacher | CrossTokenizerTeacher):
            raise ValueError(f"distill.on_policy: expected a model teacher (kdarch or Hugging Face directory) to score "
                             f"the student's samples; a {type(teacher).__name__} holds only the signal of fixed text")
        self.prompt_lengths = prompt_lengths or tail_prompts(cfg.rollout_tokens)
        self.eos_token_id, self.seed, self.rollouts = eos_token_id, seed, RolloutStats()
        scfg = student.config
        self.modules: dict[str, nn.Module] = {}
        need_teacher_model = cfg.feature_weight > 0 or cfg.relation_weight > 0
        if need_teacher_model and not isinstance(teacher, ModelTeacher):
            raise ValueError("distill.feature_weight / relation_weight need the teacher's hidden states: use a model "
                             "teacher (kdarch or Hugging Face directory), not a logit cache")
        if cfg.feature_weight > 0:
            tcfg = teacher.model.config
            self.modules["features"] = FeatureDistiller(scfg.hidden_size, tcfg.hidden_size, scfg.n_layers,
                                                        tcfg.num_hidden_layers if hasattr(tcfg, "num_hidden_layers")
                                                        else tcfg.n_layers, loss=cfg.feature_loss)
        if cfg.relation_weight > 0:
            self.relation = RelationDistiller(kind=cfg.relation_kind, over=cfg.relation_over,
                                              source=cfg.relation_source)
            if cfg.relation_source == "mla":  # both must have MLA latents: refused here, not at the first step
                mla_latent_norms(teacher.model), mla_latent_norms(student)
        self.mtp_weight = scfg.mtp_loss_weight
        self.depth_weights = list(cfg.mtp_depth_weights) or None
        if self.depth_weights is not None and cfg.mtp and len(self.depth_weights) != scfg.n_mtp_modules:
            raise ValueError(f"distill.mtp_depth_weights: expected {scfg.n_mtp_modules} weights (one per MTP module), "
                             f"got {len(self.depth_weights)}")

    def target_tokens(self, ids_BT: torch.Tensor) -> int:
        return count_targets(ids_BT, self.pad_id)

    def prepare(self, model, indices_B, ids_BT, progress: float) -> MicroBatch:
        """The rows' labels; on an on-policy step first the student's samples from their prompts."""
        cfg = self.cfg
        step = min(self.total_steps, round(progress * self.total_steps))
        sampled = self.on_policy(step)
        if sampled:
            ids_BT, labels_BT = rollout(model, ids_BT, self.prompt_lengths(ids_BT), cfg.rollout_tokens,
                                        temperature=cfg.rollout_temperature, eos_token_id=self.eos_token_id,
                                        pad_id=self.pad_id or 0, seed=self.seed * 1_000_003 + step,
                                        rows=[int(i) for i in indices_B], stats=self.rollouts)
        else:
            labels_BT = labels_for(ids_BT, self.pad_id)
        return MicroBatch(indices_B, ids_BT, labels_BT, target_counts(labels_BT, n_depths(model)), sampled=sampled)

    def __call__(self, model, indices_B, ids_BT, progress: float) -> StepLoss:
        cfg = self.cfg
        step = min(self.total_steps, round(progress * self.total_steps))
        alpha, temperature = self.schedule.at(step, self.total_steps)
        b = _prepared(self, model, indices_B, ids_BT, progress)
        ids_BT, labels_BT, sampled, s_C = b.ids_BT, b.labels_BT, b.sampled, b.shares()
        if sampled:
            alpha = 1.0
        latents = cfg.relation_weight > 0 and cfg.relation_source == "mla"
        need_hidden = cfg.feature_weight > 0 or (cfg.relation_weight > 0 and not latents)
        with capture_mla_latents(self.teacher.model) if latents else nullcontext() as t_latents:
            t_out = self.teacher(ids_BT, indices_B, hidden_states=need_hidden)
        if self.cross:
            return self._cross_tokenizer_loss(model, ids_BT, labels_BT, t_out, alpha, temperature, sampled, s_C)
        signal = t_out.signal
        if cfg.top_k and not isinstance(signal, TopKTeacher):
            signal = TopKTeacher.from_logits(signal, cfg.top_k)
        with capture_mla_latents(model) if latents else nullcontext() as s_latents:
            out = model(ids_BT, output_hidden_states=need_hidden, output_mtp_hidden_states=cfg.mtp,
                        return_logits=False)
        loss, metrics = self._kd_loss(out.last_hidden_state, (out.mtp_hidden_states or []) if cfg.mtp else [],
                                      model.head.weight, labels_BT, signal, alpha, temperature, b.step_counts_C)
        if cfg.on_policy > 0:
            metrics["on_policy"] = float(sampled) * s_C[0]
        if out.balance_loss is not None:
            loss = loss + out.balance_loss * s_C[0]
        if cfg.feature_weight > 0:  # a mean over every position of the rows
            feat = self.modules["features"](out.hidden_states, t_out.hidden_states) * s_C[0]
            loss = loss + cfg.feature_weight * feat
            metrics["feature_loss"] = feat.detach()
        if cfg.relation_weight > 0:
            rel = (self.relation(s_latents[0], t_latents[0]) if latents
                   else self.relation(out.hidden_states, t_out.hidden_states)) * s_C[0]
            loss = loss + cfg.relation_weight * rel
            metrics["relation_loss"] = rel.detach()
        return StepLoss(loss, metrics)

    def _kd_loss(self, h_BTD, mtp_hidden, head_VD, labels_BT, signal, alpha, temperature,
                 step_counts_C) -> tuple[torch.Tensor, dict]:
        """The main head's and the MTP depths' KD loss from the student's hidden states, each head by its share of
        the step's targets (`step_counts_C`; None: these rows are the step), and its metrics."""
        cfg = self.cfg
        res = multi_token_kd_loss(h_BTD, mtp_hidden, head_VD, labels_BT, signal, depth_weights=self.depth_weights,
                                  mtp_weight=self.mtp_weight, kind=cfg.kind, temperature=temperature, alpha=alpha,
                                  beta=cfg.beta, normalisers=None if step_counts_C is None else step_counts_C[1:])
        rows = 1.0 if step_counts_C is None else h_BTD.shape[0] / step_counts_C[0].clamp_min(1)
        main = res.shares[0]
        metrics = {"kd_loss": res.main.total.detach() * main, "alpha": alpha * rows, "temperature": temperature * rows}
        if res.main.soft is not None:
            metrics["soft"] = res.main.soft.detach() * main
            if self.schedule.adaptive:  # the next step's α depends on this value: the one host read
                self.schedule.observe(res.main.soft.item())  # these rows' mean
        if res.main.hard is not None:
            metrics["hard_ce"] = res.main.hard.detach() * main
        if res.mtp is not None:
            metrics["mtp_kd_loss"] = res.mtp.detach()
        return res.total, metrics

    # --- under pipeline parallelism: the teacher and the loss on the rank of the last stage ----------------------
    def check_pipeline(self, pp: int) -> None:
        """Refuse what a pipeline's last stage cannot compute (it sees only the final hidden states), naming the
        field."""
        cfg = self.cfg
        for name in ("feature_weight", "relation_weight"):
            if getattr(cfg, name):
                raise ConfigError(f"distill.{name}: expected 0 with parallel.pp={pp} (the last pipeline stage sees "
                                  f"only the final hidden states), got {getattr(cfg, name)}")
        if self.cross:
            raise ConfigError(f"distill.cross_tokenizer: expected a teacher of the student's tokenizer with "
                              f"parallel.pp={pp}, got {cfg.cross_tokenizer!r}")
        if cfg.on_policy > 0:
            raise ConfigError(f"distill.on_policy: expected 0 with parallel.pp={pp} (the student's rollouts need the "
                              f"whole model on one rank), got {cfg.on_policy}")
        if self.schedule.adaptive:
            raise ConfigError(f"distill.alpha: expected a schedule that does not observe the loss with "
                              f"parallel.pp={pp} (only the last stage sees it), got {cfg.alpha!r}")

    def pipeline_head(self, indices_B: torch.Tensor, ids_BT: torch.Tensor, progress: float):
        """The teacher's signal for these rows, run once here, and the loss function of the pipeline's last stage:
        `head(h_bTD, mtp_hidden, head_VD, labels_bT, rows_b, step_counts_C) -> (loss, metrics)` for the micro-batch
        of rows `rows_b` of `ids_BT`, its part of the step's (`mtp_hidden()`: the MTP modules' normed hidden states,
        as the model computes them; `head_VD`: the output head's weight; `step_counts_C`: the step's
        `target_counts`)."""
        cfg = self.cfg
        step = min(self.total_steps, round(progress * self.total_steps))
        alpha, temperature = self.schedule.at(step, self.total_steps)
        signal = self.teacher(ids_BT, indices_B).signal
        if cfg.top_k and not isinstance(signal, TopKTeacher):
            signal = TopKTeacher.from_logits(signal, cfg.top_k)

        def head(h_bTD, mtp_hidden, head_VD, labels_bT, rows_b, step_counts_C):
            rows = signal.take(rows_b) if isinstance(signal, TopKTeacher) else signal.index_select(0, rows_b)
            return self._kd_loss(h_bTD, mtp_hidden() if cfg.mtp else [], head_VD, labels_bT, rows, alpha, temperature,
                                 step_counts_C)
        return head

    def _cross_tokenizer_loss(self, model, ids_BT, labels_BT, t_out, alpha, temperature, sampled, s_C) -> StepLoss:
        cfg = self.cfg
        out = model(ids_BT, labels=labels_BT, return_logits=False)  # for the MTP loss
        # the logits that come back with labels carry no autograd history: the head's own, which do
        logits_BTV = model.head(out.last_hidden_state)
        terms = cross_tokenizer_kd_loss(logits_BTV, t_out, labels_BT, mode=cfg.cross_tokenizer, kind=cfg.kind,
                                        temperature=temperature, alpha=alpha, beta=cfg.beta,
                                        hard_weight=0.0 if sampled else 1.0, return_terms=True)  # uld's hard term
        main = s_C[1]
        loss = terms.total * main
        metrics = {"kd_loss": loss.detach(), "soft": terms.soft * main, "alpha": alpha * s_C[0],
                   "temperature": temperature * s_C[0],
                   "aligned_fraction": terms.n_aligned / terms.n_tokens.clamp_min(1) * main}
        if terms.hard is not None:
            metrics["hard_ce"] = terms.hard * main
        if cfg.on_policy > 0:
            metrics["on_policy"] = float(sampled) * s_C[0]
        if out.mtp_losses:
            mtp = sum(m * s for m, s in zip(out.mtp_losses, s_C[2:])) / len(out.mtp_losses)
            loss = loss + self.mtp_weight * mtp
            metrics["mtp_loss"] = mtp.detach()
        if out.balance_loss is not None:
            loss = loss + out.balance_loss * s_C[0]
        return StepLoss(loss, metrics)

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "rollouts": self.rollouts.as_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.rollouts = RolloutStats(**state.get("rollouts", {}))

