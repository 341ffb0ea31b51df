"""A student that starts from its teacher's weights: layers taken, experts pruned by how much they are used.

Logit KD transfers what the teacher knows through its outputs, one batch at a time; a student of the teacher's
own family and width can also start from the teacher's weights and spend its steps adapting rather than
learning from nothing (DistilBERT takes every other teacher layer; Minitron prunes the teacher by measured
importance and then distils). `inherit_from_teacher` does this for a kdarch student of a kdarch teacher:

- embedding, final norm and head are copied (same vocabulary and width);
- the student's dense blocks come from the teacher's dense blocks and its MoE blocks from the teacher's MoE
  blocks, each evenly spaced over the teacher's blocks of that kind, first and last included;
- each MoE block keeps the routed experts that carry the most routing weight on a sample of training tokens
  (the teacher's own forward), group by group when both routers limit tokens to groups, in the teacher's order;
  their router rows and balancing biases come along, shared experts and attention are copied whole;
- the MTP modules come from the teacher's, in order, where it has them (else they keep their initialisation).

Anything that cannot be copied as is (another width, head count, latent rank, expert width, vocabulary, or
more student blocks of a kind than the teacher has) is refused with the tensor or field that differs: a
student is never half inherited.

Shape legend: N rows (of the sample; tokens, in a router's output), T tokens per row, K experts per token,
E routed experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdarch.checks import fail, tensor_arg
from kdarch.config import ModelConfig
from kdarch.model import CausalLM
from kdarch.model.moe import MoE

INITS = ("auto", "teacher", "random")


@dataclass(frozen=True)
class Inheritance:
    """What `inherit_from_teacher` copied: teacher block per student block, kept experts per MoE block."""
    layers: tuple[int, ...]
    """Teacher block index of each student block."""
    mtp: tuple[int, ...]
    """Teacher MTP module index of each student MTP module that was copied."""
    experts: dict[str, tuple[int, ...]]
    """Student MoE module name -> the teacher's expert indices it kept, in order."""

    def summary(self, n_teacher_layers: int, n_teacher_experts: int | None) -> str:
        kept = next(iter(self.experts.values()), ())
        experts = f", {len(kept)} of {n_teacher_experts} routed experts per MoE block by routed weight" \
            if n_teacher_experts else ""
        return (f"teacher blocks {list(self.layers)} of {n_teacher_layers}{experts}, "
                f"{len(self.mtp)} MTP module(s)")


def spread(n: int, over: list[int], what: str) -> list[int]:
    """n of the indices `over`, evenly spaced with the first and last included (n = 1: the last)."""
    if n > len(over):
        fail(f"distill.student_init = \"teacher\": the student's {what}", f"at most the teacher's {len(over)}", n)
    if n == 1:
        return [over[-1]]
    return [over[round(i * (len(over) - 1) / (n - 1))] for i in range(n)]


@torch.no_grad()
def routed_weight(teacher: CausalLM, sample_NT: torch.Tensor, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per teacher MoE module: the routing weight each expert received over the sample's tokens [E]
    (the teacher's eval forward, MTP modules included)."""
    totals: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in teacher.named_modules():
        if isinstance(module, MoE):
            def hook(gate, args, out, name=name, E=module.n_experts):
                ids_NK, weights_NK, _ = out
                total = totals.setdefault(name, torch.zeros(E, dtype=torch.float64, device=ids_NK.device))
                total.index_add_(0, ids_NK.flatten(), weights_NK.flatten().double())
            hooks.append(module.gate.register_forward_hook(hook))
    was_training = teacher.training
    teacher.eval()
    try:
        device = next(teacher.parameters()).device
        for rows_BT in sample_NT.split(batch_size):
            teacher(rows_BT.to(device), output_mtp_hidden_states=True, return_logits=False)
    finally:
        for h in hooks:
            h.remove()
        teacher.train(was_training)
    return totals


def keep_experts(weight_E: torch.Tensor, n_keep: int, n_group_t: int, n_group_s: int, where: str) -> list[int]:
    """The n_keep most used experts, group by group when the routers group them (same group count, the same
    share of each group), else over all of them; in the teacher's order."""
    E = weight_E.numel()
    if n_keep > E:
        fail(f"distill.student_init = \"teacher\": {where}'s routed experts", f"at most the teacher's {E}", n_keep)
    if n_group_s > 1:
        if n_group_t != n_group_s:
            fail(f"distill.student_init = \"teacher\": {where}'s n_group",
                 f"the teacher's {n_group_t} (grouped routing keeps experts group by group)", n_group_s)
        per_t, per_s = E // n_group_t, n_keep // n_group_s
        groups = weight_E.view(n_group_t, per_t).topk(per_s, dim=1).indices + torch.arange(n_group_t)[:, None] * per_t
        return sorted(groups.flatten().tolist())
    return sorted(weight_E.topk(n_keep).indices.tolist())


EXPERT_TENSORS = ("ffn.w_gate_up", "ffn.w_down", "ffn.gate.weight", "ffn.gate.bias")
"""A block's tensors indexed by routed expert first: the student keeps the rows of its kept experts."""


def copy_into(dst: nn.Module, src: nn.Module, where: str, experts: list[int] | None = None) -> None:
    """dst's parameters and persistent buffers from src's of the same names; with `experts`, a block's
    routed-expert tensors (EXPERT_TENSORS) through those teacher experts."""
    src_state = src.state_dict()
    for name, dst_t in dst.state_dict().items():
        src_t = src_state.get(name)
        if src_t is None:
            fail(f"distill.student_init = \"teacher\": the student's {where}.{name}", "a tensor the teacher has too",
                 "none in the teacher")
        if experts is not None and name in EXPERT_TENSORS:
            src_t = src_t[experts]
        if src_t.shape != dst_t.shape:
            fail(f"distill.student_init = \"teacher\": the student's {where}.{name}",
                 f"the teacher's shape {tuple(src_t.shape)}", tuple(dst_t.shape))
        dst_t.copy_(src_t)


@torch.no_grad()
def inherit_from_teacher(student: CausalLM, teacher: CausalLM, sample_NT: torch.Tensor | None) -> Inheritance:
    """Overwrite `student`'s weights with the teacher's (module docstring); `sample_NT` are training token
    rows the teacher's routing is measured on (None: keep the first experts, a dry run of the shapes).
    Returns what was copied."""
    for who, m in (("student", student), ("teacher", teacher)):
        if not isinstance(m, CausalLM):
            fail(f"distill.student_init = \"teacher\": the {who}", "a kdarch CausalLM", type(m).__name__)
    s_cfg, t_cfg = student.config, teacher.config
    if sample_NT is None:  # a dry run (e.g. on the meta device): the shapes, with the first experts kept
        weights = {n: -torch.arange(m.n_experts, dtype=torch.float64) for n, m in teacher.named_modules()
                   if isinstance(m, MoE)}
    else:
        tensor_arg("inherit_from_teacher: sample_NT", sample_NT, dim=2, dtypes=(torch.long, torch.int32), nonempty=True)
        weights = routed_weight(teacher, sample_NT)

    layers = [0] * s_cfg.n_layers
    for moe, kind in ((False, "dense"), (True, "moe")):
        s_idx = [i for i in range(s_cfg.n_layers) if s_cfg.is_moe_layer(i) == moe]
        t_idx = [i for i in range(t_cfg.n_layers) if t_cfg.is_moe_layer(i) == moe]
        for i, j in zip(s_idx, spread(len(s_idx), t_idx, f"{kind} blocks") if s_idx else []):
            layers[i] = j

    experts: dict[str, tuple[int, ...]] = {}

    def copy_block(dst: nn.Module, src: nn.Module, s_name: str, t_name: str) -> None:
        keep = None
        if isinstance(getattr(dst, "ffn", None), MoE):
            t_moe = f"{t_name}.ffn"
            keep = keep_experts(weights[t_moe].cpu(), s_cfg.n_routed_experts, t_cfg.n_group, s_cfg.n_group, s_name)
            experts[f"{s_name}.ffn"] = tuple(keep)
        copy_into(dst, src, s_name, keep)

    for i, j in enumerate(layers):
        copy_block(student.layers[i], teacher.layers[j], f"layers.{i}", f"layers.{j}")
    mtp = list(range(min(len(student.mtp), len(teacher.mtp))))
    for k in mtp:
        s_mtp, t_mtp = student.mtp[k], teacher.mtp[k]
        copy_block(s_mtp.block, t_mtp.block, f"mtp.{k}.block", f"mtp.{k}.block")
        for name, child in s_mtp.named_children():
            if name != "block":
                copy_into(child, getattr(t_mtp, name), f"mtp.{k}.{name}")
    for name in ("embed", "norm", "head"):
        copy_into(getattr(student, name), getattr(teacher, name), name)
    return Inheritance(tuple(layers), tuple(mtp), experts)


def check_inheritable(student: ModelConfig, teacher: ModelConfig) -> None:
    """Raise the error `inherit_from_teacher` would, from the configs alone (models on the meta device)."""
    with torch.device("meta"):
        student_model, teacher_model = CausalLM(student), CausalLM(teacher)
    inherit_from_teacher(student_model, teacher_model, None)
