"""The masks of packed rows for each attention kernel (preftune.model.attention), and the refusals.

The end-to-end proof that these masks are right is tests/test_arch_matrix.py (packed = one at a time on nine
architectures); here each rule is checked on its own.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from preftune.model import attention
from preftune.train.batching import FIRST_ANSWER, PROMPT, pack_documents


def _config(arch: str = "llama", kernel: str = "sdpa", **values: object) -> object:
    config = AutoConfig.for_model(arch, num_hidden_layers=2, **values)
    config._attn_implementation = kernel
    return config


def _batch(shared: bool = True) -> dict[str, torch.Tensor]:
    """Two documents in one row of 32: a prompt of 6 with answers of 5 and 4 (sharing it, or two documents)."""
    prompt, chosen, rejected = list(range(10, 16)), list(range(20, 25)), list(range(30, 34))
    if shared:
        docs = [
            [(prompt, PROMPT, -1), (chosen, 1, 0), (rejected, 2, 1)],
            [(prompt, PROMPT, -1), (chosen, 1, 2)],
        ]
    else:
        docs = [
            [(prompt, PROMPT, -1), (chosen, FIRST_ANSWER, 0)],
            [(prompt, PROMPT, -1), (rejected, FIRST_ANSWER, 1)],
        ]
    return pack_documents(docs, 0, 32)


def test_sdpa_gets_the_boolean_mask_as_built() -> None:
    batch = _batch()
    call = attention.packed_call(batch, _config(), torch.float32)
    assert call.inputs["attention_mask"] is batch["attention_mask"] and call.rows is None


@pytest.mark.parametrize("kernel", ["eager", "flex_attention"])
def test_additive_kernels_get_zero_or_the_dtype_minimum(kernel: str) -> None:
    batch = _batch()
    for dtype in (torch.float32, torch.bfloat16):
        mask = attention.packed_call(batch, _config(kernel=kernel), dtype).inputs["attention_mask"]
        assert mask.dtype == dtype
        assert torch.equal(mask == 0, batch["attention_mask"])
        assert torch.equal(mask == torch.finfo(dtype).min, ~batch["attention_mask"])


def test_a_window_shorter_than_a_document_is_baked_in_per_layer_type() -> None:
    batch = _batch()
    positions = batch["position_ids"]
    mixed = _config("qwen2", "sdpa", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    masks = attention.packed_call(batch, mixed, torch.float32).inputs["attention_mask"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"] is batch["attention_mask"]
    distance = positions[0, :, None] - positions[0, None, :]
    sliding = masks["sliding_attention"][0, 0]
    assert torch.equal(sliding, batch["attention_mask"][0, 0] & (distance < 4))
    assert not torch.equal(sliding, batch["attention_mask"][0, 0]), "the window cuts these documents"
    # one layer type (Mistral): the window goes into the single mask
    single = attention.packed_call(batch, _config("mistral", "eager", sliding_window=4), torch.float32)
    assert torch.equal(single.inputs["attention_mask"][0, 0] == 0, sliding)
    # a window longer than every document changes nothing
    wide = _config("qwen2", "sdpa", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    assert (
        attention.packed_call(batch, wide, torch.float32).inputs["attention_mask"] is batch["attention_mask"]
    )


def test_flash_kernels_get_one_row_of_documents_told_apart_by_position_ids() -> None:
    batch = _batch(shared=False)
    call = attention.packed_call(batch, _config(kernel="flash_attention_2"), torch.bfloat16)
    assert set(call.inputs) == {"input_ids", "position_ids"} and call.rows == 1
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(call.inputs["position_ids"])
    # flash_attn_varlen_func's sequences: the two documents, then the padding one token each
    assert cu_seqlens.tolist()[:3] == [0, 11, 21]
    assert all(b - a == 1 for a, b in zip(cu_seqlens.tolist()[2:], cu_seqlens.tolist()[3:], strict=False))
    out = torch.arange(32.0).reshape(1, 32, 1)
    assert call.unflatten(out).shape == (1, 32, 1)


def test_a_shared_prompt_under_flash_is_refused_naming_model_and_setting() -> None:
    config = _config("qwen2", "flash_attention_2")
    config._name_or_path = "acme/qwen-tiny"
    with pytest.raises(
        ValueError,
        match=r"acme/qwen-tiny \(qwen2\) with attn_implementation='flash_attention_2'.*"
        r"prefix_sharing=False",
    ):
        attention.packed_call(_batch(shared=True), config, torch.bfloat16)
    with pytest.raises(ValueError, match="prefix_sharing"):
        attention.check_packing(config, prefix_sharing=True)
    attention.check_packing(config, prefix_sharing=False)


def test_kernels_and_layers_no_mask_can_express_are_refused() -> None:
    with pytest.raises(ValueError, match="cannot give this kernel the mask of packed rows"):
        attention.check_packing(_config(kernel="paged_attention"), prefix_sharing=False)
    chunked = _config()
    chunked.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention layers.*pack_length=0 and prefix_sharing=False"):
        attention.check_packing(chunked, prefix_sharing=False)


def test_flex_attention_is_refused_off_cuda() -> None:
    with pytest.raises(ValueError, match="flex attention's backward on CUDA devices only"):
        attention.check_device(_config(kernel="flex_attention"), torch.device("cpu"))
    attention.check_device(_config(kernel="sdpa"), torch.device("cpu"))


def test_the_compute_dtype_is_autocasts_or_the_embeddings() -> None:
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(4, 2).to(torch.bfloat16)  # type: ignore[method-assign]
    assert attention.compute_dtype(model, torch.device("cpu")) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.float16):
        assert attention.compute_dtype(model, torch.device("cpu")) == torch.float16
