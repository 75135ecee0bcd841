"""sparse_attn.ops: one entry (attention / plan) that runs a layout on its kernel family; and the suite's
poisoned kernel outputs are really poisoned."""
import pytest
import torch

from helpers import DEV, check_attention, qkv, random_layout
from sparse_attn import ops
from sparse_attn.layouts import BlockLayout, VerticalSlashLayout
from sparse_attn.ops import block_sparse, vertical_slash

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@pytest.mark.parametrize("kind, family", [(BlockLayout, block_sparse), (VerticalSlashLayout, vertical_slash)])
def test_attention_runs_each_layout_on_its_family(kind, family):
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(gen, 1, 4, 2, 130, 150, 32, dtype=torch.float16)
    layout = random_layout(kind, gen, 1, 4, 130, 150, 32)
    assert ops.kernel_family(layout) is family and family.LAYOUT is kind
    out, _ = check_attention(ops.attention, q, k, v, layout)
    assert torch.equal(out, family.attention(q, k, v, layout))
    plan = ops.plan(q, k, v, layout)
    assert plan is not None and plan.layout is layout
    assert torch.equal(ops.attention(q, k, v, layout, plan=plan), out)


def test_a_layout_subclass_runs_on_its_parents_family():
    class Tagged(BlockLayout):
        pass

    gen = torch.Generator().manual_seed(2)
    q, k, v = qkv(gen, 1, 2, 1, 100, d=16, dtype=torch.float16)
    drawn = random_layout(BlockLayout, gen, 1, 2, 100, 100, 16)
    layout = Tagged(drawn.counts, drawn.indices, 16, 16, 100, 100)
    assert ops.kernel_family(layout) is block_sparse
    check_attention(ops.attention, q, k, v, layout)


def test_what_no_family_runs_is_refused():
    q, k, v = qkv(3, 1, 2, 1, 40, d=16)
    with pytest.raises(TypeError, match="no kernel family runs Tensor"):
        ops.attention(q, k, v, torch.ones(1, 2, 40, 40, dtype=torch.bool, device=DEV))
    with pytest.raises(TypeError, match="LAYOUT"):
        ops.register_kernel_family(torch)


def test_kernel_outputs_start_poisoned():
    """The `poisoned_outputs` fixture reaches every allocator the kernels take their outputs from."""
    from sparse_attn.estimators.vertical_slash import build_vertical_slash_index
    from sparse_attn.estimators.vertical_slash import index
    from sparse_attn.ops.block_sparse import kernel as bs_kernel

    q = torch.zeros(1, 2, 8, 16, dtype=torch.float16)
    for out, lse in (bs_kernel._outputs(q, True), vertical_slash._alloc_outputs(q, True)):
        assert out.isnan().all() and lse.isnan().all()
    vertical, slash = torch.tensor([[[3, 1]]]), torch.tensor([[[0]]])
    tables = index._prepare(vertical, slash, 64, 64, 16)
    assert all((t == -7).all() for t in index._outputs(tables, 4))
    layout = build_vertical_slash_index(vertical, slash, 64, 64, 16, backend="torch")
    layout.check_values()  # the builder overwrote what it hands out
