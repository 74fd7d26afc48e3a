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
