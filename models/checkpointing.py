"""Activation checkpointing of transformer blocks, full or selective.

`full` keeps a block's inputs and recomputes the whole block in the backward. The selective policies
(torch's selective activation checkpointing, `torch.utils.checkpoint.create_selective_checkpoint_contexts`)
also keep the outputs of named ops: `save_matmuls` the matrix products and attention, `save_attention`
the attention only. Every policy gives the gradients of no checkpointing; they trade memory for the
recomputation they skip (benchmarks/bench_gpu.py measures both).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

CHECKPOINT_POLICIES = ("full", "save_matmuls", "save_attention")

_aten = torch.ops.aten
# the ops whose outputs selective checkpointing keeps: matrix products (the linear layers, LoRA
# included) and attention, the expensive parts of a block
MATMUL_OPS = frozenset((_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default))
ATTENTION_OPS = frozenset(
    op
    for op in (
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        getattr(getattr(_aten, "_scaled_dot_product_flash_attention_for_cpu", None), "default", None),
    )
    if op is not None
)
SAVED_OPS = {"save_matmuls": MATMUL_OPS | ATTENTION_OPS, "save_attention": ATTENTION_OPS}


def _saving(ops: frozenset):
    def policy(ctx, op, *args, **kwargs):
        from torch.utils.checkpoint import CheckpointPolicy

        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def checkpoint(fn, *args, policy: str = "full"):
    """Non-reentrant activation checkpointing of fn(*args) with a `CHECKPOINT_POLICIES` policy."""
    from torch.utils.checkpoint import checkpoint as ckpt
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    if policy == "full":
        return ckpt(fn, *args, use_reentrant=False)
    context = partial(create_selective_checkpoint_contexts, _saving(SAVED_OPS[policy]))
    return ckpt(fn, *args, use_reentrant=False, context_fn=context)


def checkpointed_forward(policy: str):
    """A block's own forward under `checkpoint` (with `policy`) while gradients are on, to bind to the
    block with MethodType (`IConFace.compile_blocks`, which compiles it: the recomputation is part of
    the graph)."""

    def forward(block: nn.Module, *args):
        if torch.is_grad_enabled():
            return checkpoint(type(block).forward, block, *args, policy=policy)
        return type(block).forward(block, *args)

    return forward
