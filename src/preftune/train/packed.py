"""Forward passes over packed batches (``batching.pack_documents``): outputs at the scored positions only.

DPO, SFT and PPO all score some tokens of packed rows. These helpers run the model once and read its final
hidden states where a scored token is predicted; with the fused head (``losses.head_logprobs``) the LM head then
runs on those positions alone, in chunks, so the ``(tokens, vocab)`` logits of a whole batch never exist.
"""

from __future__ import annotations

from typing import Any

import torch

from preftune.model import attention
from preftune.model.losses import head_logprobs, token_logprobs

#: The model inputs of a packed batch (the attention mask as pack_documents builds it: boolean, "may attend").
INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def unwrap(model: Any) -> Any:
    """The model under DDP/FSDP/compile wrappers (PEFT models pass their head through)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def packed_call(model: Any, batch: dict[str, torch.Tensor]) -> attention.PackedCall:
    """The inputs of a packed batch for ``model``'s attention kernel (preftune.model.attention): a boolean mask
    for sdpa, an additive one in the compute dtype for eager and flex attention, one flattened row with
    position ids for flash kernels (refused for shared prompts); sliding windows baked in where they matter."""
    device = batch["input_ids"].device
    config = attention.config_of(model)
    return attention.packed_call(batch, config, attention.compute_dtype(model, device))


def check_kernel(model: Any, device: Any, *, packed: bool, prefix_sharing: bool = False) -> None:
    """Refuse, before training, an attention kernel that cannot run here or cannot mask the batches a stage
    will build (``packed`` rows; ``prefix_sharing``: answers sharing one prompt), naming the model and the
    setting (preftune.model.attention)."""
    config = attention.config_of(model)
    attention.check_device(config, device)
    if packed:
        attention.check_packing(config, prefix_sharing=prefix_sharing)


def packed_inputs(batch: dict[str, torch.Tensor], model: Any = None) -> dict[str, torch.Tensor]:
    """The model inputs of a packed batch: for ``model``'s kernel when given (see :func:`packed_call`; a flash
    kernel needs the call's ``unflatten``, so use packed_call there), else as built (sdpa's boolean mask)."""
    if model is None:
        return {k: batch[k] for k in INPUT_KEYS}
    call = packed_call(model, batch)
    if call.rows is not None:
        raise ValueError("a flash-attention model flattens packed rows: use packed_call and its unflatten")
    return call.inputs


def fused_head_weight(model: Any) -> torch.Tensor | None:
    """The LM head's weight when ``head_logprobs`` computes exactly what the model's own head would: a
    bias-free linear head with no logit soft-capping (Llama-style models). None otherwise."""
    head = unwrap(model).get_output_embeddings()
    config = getattr(unwrap(model), "config", None)
    if head is None or getattr(head, "bias", None) is not None or not isinstance(head.weight, torch.Tensor):
        return None
    if getattr(config, "final_logit_softcapping", None):
        return None
    return head.weight


def scored_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final (normed) hidden states ``(scored tokens, hidden)`` of the positions that predict the targets.

    ``logits_to_keep=1``: the model's own head runs on one position per row only.
    """
    call = packed_call(model, batch)
    out = model(**call.inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return call.unflatten(out.hidden_states[-1])[batch["target_row"], batch["target_src"]]


def scored_logprobs(
    model: Any,
    batch: dict[str, torch.Tensor],
    *,
    fused_head: bool = True,
    chunk_size: int = 1024,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probability of every scored token of a packed batch ``(scored tokens,)``, float32.

    ``fused_head``: the head only on the scored positions, in chunks of ``chunk_size`` (raises for a model whose
    head it cannot reproduce, see :func:`fused_head_weight`); off: the model's full logits, read at those
    positions. Logits are divided by ``temperature`` (the sampling distribution of PPO's rollouts).
    """
    targets = batch["target_ids"]
    if fused_head:
        weight = fused_head_weight(model)
        if weight is None:
            raise ValueError(
                "fused_head needs a bias-free LM head without logit soft-capping; set fused_head=False"
            )
        hidden = scored_hidden(model, batch)
        if temperature != 1.0:
            hidden = hidden / temperature
        return head_logprobs(hidden, weight, targets, chunk_size)
    call = packed_call(model, batch)
    logits = call.unflatten(model(**call.inputs, use_cache=False).logits)[
        batch["target_row"], batch["target_src"]
    ]
    if temperature != 1.0:
        logits = logits / temperature
    return token_logprobs(logits.unsqueeze(0), targets.unsqueeze(0))[0]


def classifier_head(model: Any) -> torch.nn.Module:
    """The score head of a sequence classifier (``score``; under PEFT the ``modules_to_save`` wrapper, which
    runs the trained copy)."""
    inner = unwrap(model)
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = getattr(inner, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(inner).__name__} has no 'score' head to read per-position outputs from")
    return head


def classifier_outputs_at(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A sequence classifier's outputs ``(reads, labels)`` at the packed positions ``batch["score_row"]``,
    ``batch["score_pos"]``, from one forward over the packed rows.

    A transformers classifier applies its head to every position, then pools the rightmost non-pad token of a
    row; a packed row holds many documents, so the per-position outputs are taken from the head itself (a
    forward hook) and read where each document would have been pooled alone. The forward still goes through
    ``model`` (and so through a DDP wrapper's gradient bookkeeping); the head's arithmetic is the model's own.
    """
    captured: list[torch.Tensor] = []
    handle = classifier_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    call = packed_call(model, batch)
    try:
        model(**call.inputs, use_cache=False)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the score head ran {len(captured)} times in one forward; expected once")
    return call.unflatten(captured[0])[batch["score_row"], batch["score_pos"]]
