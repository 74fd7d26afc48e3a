"""The merge math: tensors in, tensors out. Everything here computes in float32.

Shapes follow PyTorch's ``nn.Linear`` convention, ``W: (out, in)``. GPT-2's ``Conv1D`` stores the
transpose, ``(in, out)``; PEFT marks such layers ``fan_in_fan_out`` and so do these functions.
"""

from __future__ import annotations

import torch


def linear_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA's weight update for a linear layer, in ``nn.Linear`` orientation.

    Args:
        a: ``lora_A.weight``, shape (r, in).
        b: ``lora_B.weight``, shape (out, r).
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).

    Returns:
        ``scale * B @ A``, shape (out, in), float32.
    """
    # (out, r) @ (r, in) -> (out, in)
    return (b.float() @ a.float()) * scale


def embedding_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """LoRA's update for an embedding table.

    Args:
        a: ``lora_embedding_A``, shape (r, num_embeddings).
        b: ``lora_embedding_B``, shape (dim, r).

    Returns:
        ``scale * (B @ A).T``, shape (num_embeddings, dim), float32.
    """
    # ((dim, r) @ (r, num)).T -> (num, dim)
    return (b.float() @ a.float()).T * scale


def merge_linear(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one LoRA pair into a linear weight: plain LoRA, or DoRA when ``magnitude`` is given.

    Args:
        weight: the base weight, (out, in), or (in, out) when ``fan_in_fan_out``.
        a: (r, in); b: (out, r).
        scale: the LoRA scale.
        fan_in_fan_out: the weight is stored transposed (GPT-2 ``Conv1D``).
        magnitude: DoRA's ``lora_magnitude_vector``, shape (out,).

    Returns:
        The merged weight in float32, in the same orientation as ``weight``.
    """
    w = weight.float()
    if fan_in_fan_out:
        w = w.T  # (in, out) -> (out, in)
    # W + scale * B @ A in one fused pass: (out, in) + (out, r) @ (r, in)
    merged = torch.addmm(w, b.float(), a.float(), alpha=scale)
    if magnitude is not None:
        merged = dora_rescale(merged, magnitude)
    return merged.T if fan_in_fan_out else merged


def dora_rescale(merged: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA: rescale each output row of ``W + dW`` to the trained magnitude.

    ``W' = (m / ||W + dW||_row)[:, None] * (W + dW)``, the norm taken over each output row of
    the (out, in) weight, as PEFT's ``DoraLinearLayer`` does.
    """
    norms = torch.linalg.vector_norm(merged, dim=1)  # (out,)
    return merged * (magnitude.float() / norms)[:, None]  # (out, in) * (out, 1)


def merge_bias(bias: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``lora_bias``: the LoRA B layer's bias adds ``scale * b`` to the base bias, (out,)."""
    return bias.float() + lora_b_bias.float() * scale


def expert_factors(a: torch.Tensor, b: torch.Tensor, *, expert: int, experts: int,
                   b_left: bool, transposed: bool, rows: tuple[int, int, int],
                   cols: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors of one disk tensor cut from a parameter PEFT adapts whole
    (``target_parameters``: ``lora.ParamWrapper``, e.g. an MoE block's stacked experts).

    PEFT's layout, for ``E = experts`` and rank ``r``: ``a`` is (r·E, in) with expert ``e`` in
    rows ``e·r .. e·r+r``; ``b`` is (out, r·E) with the expert index varying fastest, so expert
    ``e`` owns columns ``e, e+E, e+2E, ...``. The update of the parameter's slice ``P[e]`` is
    ``L @ R`` with ``L = B_e, R = A_e`` when ``b_left`` (``P[e]`` is (out, in)), else
    ``L = A_eᵀ, R = B_eᵀ`` (``P[e]`` is (in, out)).

    The disk tensor holds ``P[e][rows, cols]`` (``(start, step, count)`` along ``P[e]``'s two
    dimensions), or its transpose when ``transposed``.

    Returns:
        ``(a2, b2)`` with the disk tensor's update ``b2 @ a2`` (scale aside): a2 (r, n1),
        b2 (n0, r), where (n0, n1) is the disk tensor's shape.
    """
    r = a.shape[0] // experts
    a_e = a[expert * r:(expert + 1) * r]  # (r, in)
    b_e = b[:, expert::experts]  # (out, r)
    left, right = (b_e, a_e) if b_left else (a_e.T, b_e.T)  # (d1, r), (r, d2)
    if transposed:  # the disk tensor is P[e][rows, cols].T: dim 0 runs along d2
        left, right = right.T, left.T  # (d2, r), (r, d1)
    r0, rs, rn = rows
    c0, cs, cn = cols
    b2 = left[r0:r0 + rs * rn:rs]  # (n0, r)
    a2 = right[:, c0:c0 + cs * cn:cs]  # (r, n1)
    return a2.contiguous(), b2.contiguous()
