"""This machine's matmul ceiling for a model's own shapes (torch.utils.benchmark), in FLOP/s."""

from __future__ import annotations

from typing import Any

from benchmarks import common


def run(impl: str = "", *, model: str = "20m", tokens: int = 1024) -> dict[str, Any]:
    import torch
    from torch.utils import benchmark
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(common.model_dir(model))
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    qkvo = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    # (in, out, how many per token per layer) of every linear layer, then the LM head once.
    shapes = [(h, qkvo, 1), (h, kv, 2), (qkvo, h, 1), (h, i, 2), (i, h, 1)]
    total_flops = total_seconds = 0.0
    per_shape = []
    for k, n, count in [*[(a, b, c * config.num_hidden_layers) for a, b, c in shapes], (h, v, 1)]:
        x = torch.randn(tokens, k)
        w = torch.randn(n, k)
        timer = benchmark.Timer(
            stmt="torch.nn.functional.linear(x, w)",
            globals={"x": x, "w": w, "torch": torch},
            num_threads=torch.get_num_threads(),
        )
        seconds = timer.blocked_autorange(min_run_time=0.5).median
        flops = 2.0 * tokens * k * n
        per_shape.append({"shape": [tokens, k, n], "gflops": flops / seconds / 1e9})
        total_flops += flops * count
        total_seconds += seconds * count
    return {
        "ceiling_flops": total_flops / total_seconds,
        "per_shape": per_shape,
        "tokens": tokens,
        "matmul_params": common.matmul_params(config),
        "head_params": h * v,
    }
