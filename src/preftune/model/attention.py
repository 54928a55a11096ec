"""Attention masks of packed rows, in the form each attention kernel reads correctly, or a clear refusal.

A packed row holds several documents, and a prefix-shared document holds answers that see their prompt but not
each other (preftune.train.batching.pack_documents). Its logical mask is a 4-D boolean ``(rows, 1, L, L)``,
True where a query may attend a key. transformers hands a 4-D mask to the kernel as it is, and the kernels read
it differently:

- ``sdpa`` reads a boolean as "may attend": it gets the boolean.
- ``eager`` and ``flex_attention`` *add* the mask to the scores: they get an additive float mask, 0 where
  allowed and the dtype's minimum elsewhere, in the compute dtype (a boolean would add 1 and mask nothing).
- ``flash_attention_2`` (and other flash kernels) take no mask at all. Packed documents are told apart by their
  position ids restarting at 0 (varlen), which transformers only does for one flattened row: the rows are
  flattened into one and the outputs reshaped back. A shared prompt cannot be expressed that way, so
  prefix-shared batches are refused with an error naming the model and the setting.

A custom 4-D mask also switches off the sliding window transformers would add: where a document is longer than a
model's window, the window is baked into the mask (by position ids), per layer type for models that mix full and
sliding layers (a ``{"full_attention": ..., "sliding_attention": ...}`` mapping, which those models accept).
Layer types that no mask here can express (chunked or linear attention) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: Kernels that take a 4-D mask (boolean or additive) through transformers.
MASKED = ("eager", "sdpa", "flex_attention")
_LAYER_TYPES = {"full_attention", "sliding_attention"}


#: Kernels besides flash ones that take no mask and tell packed documents apart by their position ids, as
#: transformers drives flash_attn_varlen_func (a custom kernel registered with transformers' AttentionInterface).
VARLEN_KERNELS: set[str] = set()


def is_flash(implementation: str | None) -> bool:
    """True for flash-attention kernels (flash_attention_2/3, hub kernels) and :data:`VARLEN_KERNELS`: no mask,
    packed documents by position ids."""
    return bool(implementation) and ("flash" in str(implementation) or str(implementation) in VARLEN_KERNELS)


def config_of(model: Any) -> Any:
    """The transformers config under any wrappers (DDP, torch.compile, PEFT, preftune's value model)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif hasattr(model, "config") and hasattr(model.config, "model_type"):
            return model.config
        elif isinstance(getattr(model, "model", None), torch.nn.Module):
            model = model.model
        else:
            break
    raise ValueError(f"{type(model).__name__}: no transformers config found under its wrappers")


def implementation(config: Any) -> str:
    """The attention kernel a model runs (``config._attn_implementation``; sdpa when unset)."""
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


def model_name(config: Any) -> str:
    name = getattr(config, "_name_or_path", "") or ""
    return f"{name} ({config.model_type})" if name else str(config.model_type)


def check_packing(config: Any, *, prefix_sharing: bool, setting: str = "prefix_sharing") -> None:
    """Refuse before training a kernel that cannot mask what the batches will hold.

    ``prefix_sharing``: some batches hold answers sharing one prompt. ``setting`` names the parameter a user
    turns off to make the combination possible.
    """
    kernel = implementation(config)
    if is_flash(kernel):
        if prefix_sharing:
            raise ValueError(
                f"{model_name(config)} with attn_implementation={kernel!r}: flash attention takes no attention "
                f"mask, so answers that share one prompt cannot be kept apart ({setting}=True). Set "
                f"{setting}=False (packing still works, through position ids) or attn_implementation='sdpa' or "
                "'eager'"
            )
        return
    if kernel not in MASKED:
        raise ValueError(
            f"{model_name(config)} with attn_implementation={kernel!r}: preftune cannot give this kernel the "
            "mask of packed rows; use one of eager, sdpa, flash_attention_2 or flex_attention"
        )
    odd = sorted(set(getattr(config, "layer_types", None) or ()) - _LAYER_TYPES)
    if odd:
        raise ValueError(
            f"{model_name(config)} has {', '.join(odd)} layers, whose mask preftune cannot build for packed rows; "
            "set pack_length=0 and prefix_sharing=False (one right-padded sequence per row)"
        )


def check_device(config: Any, device: torch.device) -> None:
    """flex_attention has no backward on CPU in PyTorch: refuse it there instead of failing mid-step."""
    if implementation(config) == "flex_attention" and torch.device(device).type != "cuda":
        raise ValueError(
            f"{model_name(config)} with attn_implementation='flex_attention': PyTorch runs flex attention's "
            "backward on CUDA devices only; use sdpa or eager on this machine"
        )


def _windows(config: Any) -> dict[str | None, int | None]:
    """Each layer type's sliding window (None = full attention); key None for models of one layer type."""
    window = getattr(config, "sliding_window", None)
    window = int(window) if isinstance(window, int) and window > 0 else None
    types = getattr(config, "layer_types", None)
    if types:
        return {t: (window if t == "sliding_attention" else None) for t in set(types)}
    return {None: window}


def _windowed(mask: torch.Tensor, positions: torch.Tensor, window: int) -> torch.Tensor:
    """``mask`` where the key is less than ``window`` positions before the query (transformers' rule)."""
    distance = positions.unsqueeze(2) - positions.unsqueeze(1)
    return mask & (distance < window).unsqueeze(1)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def masks_for(
    mask: torch.Tensor, positions: torch.Tensor, config: Any, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The 4-D mask (or per-layer-type mapping) the model's kernel reads as ``mask`` says, windows baked in."""
    kernel = implementation(config)
    check_packing(config, prefix_sharing=False)
    longest = int(positions.max()) + 1 if positions.numel() else 0
    windows = _windows(config)
    needed = {t: w for t, w in windows.items() if w is not None and longest > w}
    if needed:
        per_type = {t: (_windowed(mask, positions, w) if t in needed else mask) for t, w in windows.items()}
    else:
        per_type = {None: mask}
    if kernel != "sdpa":
        per_type = {t: _additive(m, dtype) for t, m in per_type.items()}
    if None in per_type:
        return per_type[None]
    return per_type  # type: ignore[return-value]


@dataclass
class PackedCall:
    """A packed batch's model inputs for one model, and how to read its per-position outputs back as rows."""

    inputs: dict[str, Any]
    rows: int | None = None  # the row count when the rows were flattened into one (flash kernels)

    def unflatten(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position outputs ``(rows, L, ...)`` again (a no-op unless the rows were flattened)."""
        if self.rows is None:
            return x
        return x.reshape(self.rows, -1, *x.shape[2:])


def packed_call(batch: Mapping[str, torch.Tensor], config: Any, dtype: torch.dtype) -> PackedCall:
    """The inputs of a packed batch (``input_ids``, ``position_ids``, the boolean ``attention_mask`` and
    ``shared_prefix``) for a model with ``config``, whose compute dtype is ``dtype``."""
    ids, positions, mask = batch["input_ids"], batch["position_ids"], batch["attention_mask"]
    kernel = implementation(config)
    if is_flash(kernel):
        shared = batch.get("shared_prefix")
        check_packing(config, prefix_sharing=bool(shared is not None and bool(shared)))
        return PackedCall(
            {"input_ids": ids.reshape(1, -1), "position_ids": positions.reshape(1, -1)}, ids.shape[0]
        )
    inputs = {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": masks_for(mask, positions, config, dtype),
    }
    return PackedCall(inputs)


def compute_dtype(model: Any, device: torch.device) -> torch.dtype:
    """The dtype attention scores are computed in: autocast's when it is on, else the embeddings' dtype."""
    device_type = torch.device(device).type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    inner = model
    for _ in range(8):
        if hasattr(inner, "get_input_embeddings"):
            try:
                return inner.get_input_embeddings().weight.dtype
            except (AttributeError, NotImplementedError):
                pass
        nxt = getattr(inner, "module", None) or getattr(inner, "model", None)
        if not isinstance(nxt, torch.nn.Module):
            break
        inner = nxt
    return next(p.dtype for p in model.parameters() if p.is_floating_point())
