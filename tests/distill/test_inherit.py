"""A student started from its teacher's weights: what is copied is the teacher's function where nothing is dropped,
blocks are spread evenly, unused experts are the ones pruned, and anything that does not fit is refused."""
import pytest
import torch

from kdarch.config import get_preset
from kdarch.distill.inherit import check_inheritable, inherit_from_teacher, keep_experts, spread
from kdarch.model import CausalLM
from kdarch.model.moe import MoE


def model(seed: int, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(get_preset("debug", **overrides)).eval()


def outputs(m: CausalLM, ids_BT: torch.Tensor) -> list[torch.Tensor]:
    out = m(ids_BT, output_mtp_logits=True)
    return [out.logits, *out.mtp_logits]


IDS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


def test_a_student_of_the_teacher_s_own_shape_becomes_the_teacher():
    teacher, student = model(0), model(1)
    with torch.no_grad():
        for m in teacher.modules():  # non-zero balancing biases: they must come along too
            if isinstance(m, MoE):
                m.gate.bias.normal_(0, 0.1)
    got = inherit_from_teacher(student, teacher, IDS)
    assert got.layers == (0, 1) and got.mtp == (0,)
    assert all(kept == tuple(range(8)) for kept in got.experts.values())
    with torch.no_grad():
        for s, t in zip(outputs(student, IDS), outputs(teacher, IDS), strict=True):
            assert torch.equal(s, t)


def test_pruning_the_experts_no_token_reaches_keeps_the_teacher_s_function():
    """Odd experts of a 16-expert teacher can never be chosen (a -1e4 balancing bias); a student with 8 keeps the
    even ones, group by group, and computes what the teacher computes."""
    teacher, student = model(0, n_routed_experts=16), model(1)
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, MoE):
                m.gate.bias[1::2] = -1e4
    got = inherit_from_teacher(student, teacher, IDS)
    assert set(got.experts) == {"layers.1.ffn", "mtp.0.block.ffn"}
    assert all(kept == (0, 2, 4, 6, 8, 10, 12, 14) for kept in got.experts.values())
    assert torch.equal(student.layers[1].ffn.w_down, teacher.layers[1].ffn.w_down[0::2])
    with torch.no_grad():
        for s, t in zip(outputs(student, IDS), outputs(teacher, IDS), strict=True):
            torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-5)


def test_blocks_are_spread_over_the_teacher_s_blocks_of_their_kind():
    teacher, student = model(0, n_layers=6), model(1, n_layers=4)  # 1 dense + 5 MoE blocks -> 1 dense + 3 MoE
    got = inherit_from_teacher(student, teacher, IDS)
    assert got.layers == (0, 1, 3, 5)
    for i, j in enumerate(got.layers):
        assert torch.equal(student.layers[i].attn.wkv_b.weight, teacher.layers[j].attn.wkv_b.weight)
    assert torch.equal(student.embed.weight, teacher.embed.weight)
    assert torch.equal(student.mtp[0].eh_proj.weight, teacher.mtp[0].eh_proj.weight)
    assert spread(1, [1, 2, 3], "blocks") == [3] and spread(3, [4, 5, 6], "blocks") == [4, 5, 6]


def test_the_most_routed_experts_are_kept_in_each_group():
    weight_E = torch.tensor([5., 1., 7., 3., 0., 9., 2., 8.], dtype=torch.float64)
    assert keep_experts(weight_E, 4, 2, 2, "x") == [0, 2, 5, 7]  # groups [5 1 7 3] and [0 9 2 8]
    assert keep_experts(weight_E, 2, 2, 1, "x") == [5, 7]  # an ungrouped student: over all of them
    assert keep_experts(weight_E, 2, 1, 1, "x") == [5, 7]


@pytest.mark.parametrize("student, needle", [
    (dict(n_layers=3), "the student's moe blocks: expected at most the teacher's 1, got 2"),
    (dict(hidden_size=32), "the student's layers.0.attn_norm.weight: expected the teacher's shape (64,), got (32,)"),
    (dict(n_routed_experts=16), "layers.1's routed experts: expected at most the teacher's 8, got 16"),
    (dict(n_group=1, topk_group=1, n_routed_experts=4), None),
    (dict(n_group=4, topk_group=2), "layers.1's n_group: expected the teacher's 2"),
    (dict(moe_intermediate_size=16), "the student's layers.1.ffn.w_gate_up: expected the teacher's shape"),
])
def test_what_cannot_be_copied_is_refused_from_the_configs(student, needle):
    if needle is None:
        check_inheritable(get_preset("debug", **student), get_preset("debug"))
        return
    with pytest.raises(ValueError, match="^distill.student_init = \"teacher\": ") as e:
        check_inheritable(get_preset("debug", **student), get_preset("debug"))
    assert needle in str(e.value)
