"""Load, adapt and save models, keeping the chain of stacked adapters explicit.

A model reference is a local directory, an ``s3://`` URI or a Hugging Face hub id. Artifacts that hold a LoRA
adapter name their parent artifact in ``adapter_config.json``; loading walks that chain and merges each adapter
into its parent, so "the SFT model" means the same weights whether SFT was full or LoRA.
"""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from preftune import __version__
from preftune.model.precision import fp32_trainable

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
LINEAGE_FILE = "lineage.json"
MAX_ADAPTER_DEPTH = 8
#: Weight formats that unpickle (and so can run code) when loaded; never loaded, only named in errors.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch so a run is repeatable on the same hardware."""
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def resolve(ref: str) -> str:
    """Turn a model reference into something ``from_pretrained`` takes: a local directory or a hub id."""
    if not ref or not str(ref).strip():
        raise ValueError("model reference is empty: give a local directory, an s3:// URI or a hub id")
    ref = str(ref).strip()
    for scheme in ("s3", "minio"):  # minio:// is KFP's name for artifacts under a MinIO pipeline root
        if ref.startswith(f"{scheme}://"):
            mounted = Path(f"/{scheme}") / ref[len(scheme) + 3 :]
            if mounted.is_dir():  # the KFP launcher already copied this artifact into the pod
                return str(mounted)
            from preftune.io import storage

            return str(storage.local_path(ref))
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"model reference {ref!r} is a file; a model is a directory")
        return str(path.resolve())
    if "://" in ref:
        scheme = ref.split("://", 1)[0]
        raise ValueError(
            f"model reference {ref!r}: unsupported scheme {scheme + '://'!r}; "
            "use one of: local path, file://, s3://, minio://, or a Hugging Face hub id"
        )
    if ref.startswith(("/", "./", "../")):
        raise FileNotFoundError(f"model directory {ref!r} does not exist")
    return ref  # a Hugging Face hub id, resolved by transformers (offline cache or the hub)


def require_safetensors(path: str) -> None:
    """Refuse a local model directory whose weights are not safetensors.

    Pickle-format weights (``pytorch_model.bin``, ``*.pt``) can run arbitrary code when loaded, and a model
    artifact may come from anywhere; transformers is also told ``use_safetensors=True``, this check names the
    problem and the file before anything is read. Hub ids (not local) are left to that flag.
    """
    local = Path(path)
    if not local.is_dir():
        return
    adapter = is_adapter(path)
    wanted = "adapter_model.safetensors" if adapter else "model.safetensors (or sharded *.safetensors)"
    if adapter:
        found = (local / "adapter_model.safetensors").is_file()
    else:
        found = any(local.glob("*.safetensors")) or (local / "model.safetensors.index.json").is_file()
    if found:
        return
    pickles = sorted(p.name for p in local.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{path}: holds {', '.join(pickles)} but no {wanted}; preftune loads safetensors only, because "
            "pickle-format weights can run code when loaded. Convert the weights to safetensors "
            "(save_pretrained(..., safe_serialization=True)) from a trusted environment"
        )
    raise FileNotFoundError(f"{path}: no {wanted} in this model directory")


def is_adapter(path: str) -> bool:
    """True for a directory that holds a PEFT adapter rather than full weights."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_parent(path: str) -> str:
    """The parent reference an adapter directory was trained on."""
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    parent = config.get("base_model_name_or_path")
    if not parent:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return str(parent)


def load_tokenizer(ref: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved with a model artifact, or with the nearest ancestor that has one."""
    path = resolve(ref)
    for _ in range(MAX_ADAPTER_DEPTH):
        local = Path(path)
        has_tokenizer = local.is_dir() and any(
            (local / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
        )
        if has_tokenizer or not local.is_dir() or not is_adapter(path):
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            return tokenizer
        path = resolve(adapter_parent(path))
    raise ValueError(f"{ref}: adapter chain deeper than {MAX_ADAPTER_DEPTH}; is it circular?")


def _load_kwargs(
    trust_remote_code: bool, dtype: torch.dtype | None, attn_implementation: str | None
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation and attn_implementation != "auto":
        kwargs["attn_implementation"] = attn_implementation
    return kwargs


def load_causal_lm(
    ref: str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    _depth: int = 0,
) -> PreTrainedModel:
    """A plain causal LM with every adapter in its chain merged in.

    ``dtype`` is what the weights are held in (None: the checkpoint's own); each adapter is merged into weights
    of that dtype, its delta computed in the adapter's fp32 and rounded once, so an fp32 load merges exactly.
    ``attn_implementation`` picks the attention kernel (None or ``auto``: the model's default).
    """
    if _depth > MAX_ADAPTER_DEPTH:
        raise ValueError(f"{ref}: adapter chain deeper than {MAX_ADAPTER_DEPTH}; is it circular?")
    path = resolve(ref)
    require_safetensors(path)
    if Path(path).is_dir() and is_adapter(path):
        from peft import PeftModel

        parent = load_causal_lm(
            adapter_parent(path),
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            attn_implementation=attn_implementation,
            _depth=_depth + 1,
        )
        model = PeftModel.from_pretrained(parent, path).merge_and_unload()
        model.requires_grad_(False)  # whoever trains it says what is trainable
        return model
    kwargs = _load_kwargs(trust_remote_code, dtype, attn_implementation)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _lora_config(options: dict[str, Any], **extra: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=options["lora_r"],
        lora_alpha=options["lora_alpha"],
        lora_dropout=options["lora_dropout"],
        target_modules=options["target_modules"] or "all-linear",
        **extra,
    )


def prepare_for_training(
    ref: str,
    *,
    use_lora: bool,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """The parent merged, then a fresh LoRA adapter on top when asked; trainable weights are fp32.

    ``dtype`` is the dtype frozen weights are held in (None: fp32). Without LoRA every weight is trained, so the
    whole model is loaded (and merged) in fp32: those are the master weights. With LoRA the parent stays in
    ``dtype`` and the adapter is fp32. ``model.disable_adapter()`` then gives back exactly the parent: that is how
    DPO and PPO get their reference model without a second copy in memory.
    """
    frozen = dtype or torch.float32
    model = load_causal_lm(
        ref,
        trust_remote_code=trust_remote_code,
        dtype=frozen if use_lora else torch.float32,
        attn_implementation=attn_implementation,
    )
    if not use_lora:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    options = {"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
    config = _lora_config({**options, "target_modules": target_modules}, task_type="CAUSAL_LM")
    return fp32_trainable(get_peft_model(model, config))


def _as_sequence_classifier(causal: PreTrainedModel) -> PreTrainedModel:
    """A one-scalar sequence classifier sharing the causal LM's backbone weights (the score head is new)."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    config.problem_type = "regression"
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    model = AutoModelForSequenceClassification.from_config(
        config, dtype=causal.dtype, attn_implementation=causal.config._attn_implementation
    )
    backbone = getattr(model, model.base_model_prefix)
    backbone.load_state_dict(getattr(causal, causal.base_model_prefix).state_dict())
    return model


def _is_sequence_classifier(path: str) -> bool:
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def load_reward_model(
    ref: str,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A plain one-scalar reward model (``AutoModelForSequenceClassification``), adapters merged.

    A reward artifact is either full sequence-classification weights, or a LoRA adapter (with the trained score
    head in ``modules_to_save``) on top of a causal LM chain, typically the SFT model. ``dtype`` and
    ``attn_implementation`` as in :func:`load_causal_lm`.
    """
    from transformers import AutoModelForSequenceClassification

    path = resolve(ref)
    require_safetensors(path)
    options = {
        "trust_remote_code": trust_remote_code,
        "dtype": dtype,
        "attn_implementation": attn_implementation,
    }
    if Path(path).is_dir() and is_adapter(path):
        from peft import PeftModel

        parent_ref = adapter_parent(path)
        parent_path = resolve(parent_ref)
        if (
            Path(parent_path).is_dir()
            and not is_adapter(parent_path)
            and _is_sequence_classifier(parent_path)
        ):
            parent = load_reward_model(parent_ref, **options)
        else:
            parent = _as_sequence_classifier(load_causal_lm(parent_ref, **options))
        model = PeftModel.from_pretrained(parent, path).merge_and_unload()
        model.requires_grad_(False)  # whoever trains it says what is trainable
        return model
    kwargs = {**_load_kwargs(trust_remote_code, dtype, attn_implementation), "num_labels": 1}
    return AutoModelForSequenceClassification.from_pretrained(path, **kwargs)


def prepare_reward_model(
    ref: str,
    *,
    use_lora: bool,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    """A reward model to train, initialised from a causal LM (the SFT model) or from a reward model.

    Trainable weights are fp32, the score head always (``dtype``, None = fp32, holds the frozen backbone under
    LoRA; without LoRA everything is loaded in fp32). With LoRA the score head is listed in ``modules_to_save``:
    it is trained in full and saved with the adapter. PPO uses the same call on the reward model to make its
    critic; with the adapter disabled the critic is the frozen reward model again, so one copy serves both.
    """
    path = resolve(ref)
    local = Path(path)
    options = {
        "trust_remote_code": trust_remote_code,
        "dtype": (dtype or torch.float32) if use_lora else torch.float32,
        "attn_implementation": attn_implementation,
    }
    if local.is_dir() and (
        (is_adapter(path) and _adapter_task(path) == "SEQ_CLS")
        or (not is_adapter(path) and _is_sequence_classifier(path))
    ):
        model = load_reward_model(ref, **options)
    else:
        model = _as_sequence_classifier(load_causal_lm(ref, **options))
    model.score.to(torch.float32)
    if not use_lora:
        model.requires_grad_(True)
        return model
    from peft import get_peft_model

    lora = {"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
    config = _lora_config(
        {**lora, "target_modules": target_modules}, modules_to_save=["score"], task_type="SEQ_CLS"
    )
    return fp32_trainable(get_peft_model(model, config))


def _adapter_task(path: str) -> str | None:
    config = json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config.get("task_type")


def read_lineage(ref: str) -> dict[str, Any]:
    """The lineage record of a model artifact, or a minimal one for a model from elsewhere."""
    try:
        path = Path(resolve(ref))
    except (FileNotFoundError, ValueError):
        return {"stage": "external", "base_model": ref, "chain": []}
    lineage_file = path / LINEAGE_FILE
    if lineage_file.is_file():
        return json.loads(lineage_file.read_text(encoding="utf-8"))
    return {"stage": "base", "base_model": ref, "chain": []}


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str,
    *,
    stage: str,
    parent_uri: str,
    parameters: dict[str, Any],
    data: dict[str, str],
    metrics: dict[str, float] | None = None,
    artifact_uri: str | None = None,
) -> None:
    """Save weights (safetensors only), tokenizer, lineage and a model card into one artifact directory.

    ``artifact_uri`` is where the directory will live once published (the KFP artifact URI, s3:// on a
    cluster); the lineage records it so later loads can find this model again.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter = _is_peft(model)
    if adapter:
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = parent_uri
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))

    parent = read_lineage(parent_uri)
    chain = list(parent.get("chain", [])) or [{"stage": parent.get("stage", "base"), "uri": parent_uri}]
    chain.append({"stage": stage, "uri": artifact_uri or str(out), "adapter": adapter})
    lineage = {
        "stage": stage,
        "base_model": parent.get("base_model", parent_uri),
        "parent": parent_uri,
        "adapter": adapter,
        "chain": chain,
        "parameters": parameters,
        "data": data,
        "metrics": metrics or {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "preftune_version": __version__,
    }
    (out / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str), encoding="utf-8")
    (out / "README.md").write_text(model_card(lineage), encoding="utf-8")
    log.info("saved %s model to %s (adapter=%s)", stage, out, adapter)


def model_card(lineage: dict[str, Any]) -> str:
    """A Markdown model card from a lineage record."""
    stage = lineage["stage"]
    loader = "load_reward_model" if stage == "reward" else "load_causal_lm"
    load = (
        f"from preftune.model.modeling import {loader}\n"
        f"model = {loader}('<this directory>')  # merges the adapter chain below"
    )
    if lineage.get("adapter"):
        kind = "a LoRA adapter (PEFT) on top of its parent model"
    else:
        kind = "full model weights"
    chain = "\n".join(
        f"{i + 1}. `{c.get('stage')}`: `{c.get('uri')}`" for i, c in enumerate(lineage["chain"])
    )
    params = "\n".join(f"| {k} | {v} |" for k, v in sorted(lineage.get("parameters", {}).items()))
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(lineage.get("metrics", {}).items()))
    data = "\n".join(f"- `{k}`: sha256 `{v}`" for k, v in sorted(lineage.get("data", {}).items()))
    return f"""# preftune {stage} model

This artifact holds {kind}, trained by the preftune `{stage}` stage.

- base model: `{lineage["base_model"]}`
- parent: `{lineage["parent"]}`
- created: {lineage["created"]}, preftune {lineage["preftune_version"]}

## Lineage

{chain}

## Training data

{data or "- (not recorded)"}

## Parameters

| parameter | value |
|---|---|
{params}

## Metrics

| metric | value |
|---|---|
{metrics}

## Loading

```python
{load}
```

Weights are stored as safetensors only. Custom model code is never executed unless `trust_remote_code` is set.
"""
