"""The engine's op steps, each on its own: for every op type, the block step (what streams a
tensor in row blocks) and the whole-tensor step (what quantized units use) give the same merged
tensor, whatever the block size; and a LoRA block step is ``W + scale * B @ A`` row by row.

Real plans of tiny real models and PEFT adapters; nothing is written."""

from __future__ import annotations

import pytest
import torch

from mergeflow.engine.ops import _BLOCK_STEPS, _WHOLE_OPS
from mergeflow.engine.shards import open_merger
from mergeflow.pipeline import prepare
from mergeflow.plan import MergePlan
from mergeflow.plan.model import EmbeddingLora, Lora, LoraBias, TokenRows
from mergeflow.spec import MergeSpec

CASES = {
    "lora": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
    "lora_bias": dict(arch="qwen2", target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
    "embedding": dict(target_modules=["embed_tokens", "lm_head", "k_proj"]),
    "tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 7]),
}


def _plan(make_base, make_adapter, tmp_path, options) -> MergePlan:
    options = dict(options)
    base = make_base(options.pop("arch", "llama"))  # qwen2: attention projections with a bias
    adapter = make_adapter(base, **options)
    prepared = prepare(MergeSpec(base=str(base), adapter=str(adapter), out=str(tmp_path / "out"),
                                 no_tokenizer=True))
    return MergePlan.load(prepared.plan_path)


def _streamed(merger, plan, block_bytes: int) -> torch.Tensor:
    merger.block_bytes = block_bytes
    rows, row_elems = plan.row_shape[0], int(torch.Size(plan.row_shape[1:]).numel())
    step = merger.rows_per_block(plan, row_elems)
    return torch.cat([work.clone() for _, _, work in merger.merged_rows(plan, rows, row_elems, step)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_and_whole_steps_agree_for_every_op(case, make_base, make_adapter, tmp_path):
    plan = _plan(make_base, make_adapter, tmp_path, CASES[case])
    merger = open_merger(plan)
    computed = [t for s in plan.shards for t in s.tensors if t.ops]
    assert computed, "the plan merges nothing"
    seen = set()
    for tensor in computed:
        whole = merger._compute_whole(tensor).float().reshape(tensor.row_shape)
        for block_bytes in (4096, 1 << 20):  # many small blocks, then one block
            streamed = _streamed(merger, tensor, block_bytes)
            torch.testing.assert_close(streamed, whole, rtol=1e-6, atol=1e-6, msg=tensor.name)
        seen |= {type(op) for op in tensor.ops}
    assert seen <= set(_BLOCK_STEPS) and seen <= set(_WHOLE_OPS)
    expected = {"lora": Lora, "dora": Lora, "lora_bias": LoraBias, "embedding": EmbeddingLora,
                "tokens": TokenRows}[case]
    assert expected in seen, f"{case}: no {expected.__name__} op planned"


def test_a_lora_block_step_is_the_base_plus_scaled_b_a(make_base, make_adapter, tmp_path):
    plan = _plan(make_base, make_adapter, tmp_path, CASES["lora"])
    merger = open_merger(plan)
    tensor = next(t for s in plan.shards for t in s.tensors
                  if len(t.ops) == 1 and isinstance(t.ops[0], Lora))
    module = merger.factors.adapter.modules[tensor.ops[0].module]
    base = merger.read_input(tensor).float()  # (out, in)
    a = merger.factors.tensor(module.a_key).float()  # (r, in)
    b = merger.factors.tensor(module.b_key).float()  # (out, r)
    expected = base + module.scale * (b @ a)  # (out, r) @ (r, in) -> (out, in)
    torch.testing.assert_close(_streamed(merger, tensor, 4096), expected, rtol=1e-6, atol=1e-6)
