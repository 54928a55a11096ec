"""Resumable training: periodic checkpoints in durable storage, and resuming from the latest complete one.

GPU nodes get preempted. A training step writes a checkpoint every ``every`` steps to ``uri`` (s3:// or a local
path) and, when it starts, resumes from the newest checkpoint there, so a retried pod continues instead of
starting over -- and finishes with the same weights as a run that was never interrupted.

A checkpoint is ``<uri>/step-<N>/`` holding:

- ``modules/<name>.safetensors``: the trainable parameters of each model (the LoRA adapter, or all weights);
  frozen weights are not saved, they come back from the model artifacts the step starts from;
- ``optimizers/<name>.pt`` and ``schedulers/<name>.pt``: their state dicts, read back with
  ``torch.load(weights_only=True)`` (tensors and plain values only, never pickled objects);
- ``rng.json``: every process's Python, NumPy, torch and CUDA random states;
- ``state.json``: the loop's and the trainer's resumable state (preftune.train.engine.state: position, logs,
  meters, the data generator's state at the epoch's start, ...); ``tensors.safetensors``: extra tensors, if any;
- the storage manifest, written last (preftune.io.storage.upload_dir): a checkpoint without it is incomplete and
  ignored, so a kill in the middle of a save never resumes from half a checkpoint.

A state with a NaN or infinite trainable weight or optimiser value is never written (:func:`check_finite_state`),
and the engine reads a checkpoint back (:meth:`Checkpointer.verify`) before naming it as the last good state.

Only the main process writes; every process restores. The newest ``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.io import storage

PREFIX = "step-"


@dataclass
class Restored:
    """What a resumed loop needs back: where it was, its own state, and the extra tensors it saved."""

    step: int
    uri: str
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class NonFiniteStateError(ValueError):
    """A model or optimiser holds NaN or infinite values: such a state is never written as a checkpoint."""


def _first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_state(modules: Mapping[str, torch.nn.Module], optimizers: Mapping[str, Any]) -> None:
    """Raise NonFiniteStateError naming the first trainable weight or optimiser state that is not finite."""
    for name, module in modules.items():
        params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
        bad = _first_nonfinite(params)
        if bad is not None:
            raise NonFiniteStateError(f"the {name} weight {bad} is not finite")
    for name, optimizer in optimizers.items():
        for index, state in enumerate(optimizer.state.values()):
            bad = _first_nonfinite({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
            if bad is not None:
                raise NonFiniteStateError(f"the {name} optimiser's {bad} of parameter {index} is not finite")


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _step_of(name: str) -> int | None:
    digits = name[len(PREFIX) :] if name.startswith(PREFIX) else ""
    return int(digits) if digits.isdigit() else None


class Checkpointer:
    """Saves and restores the training state of one stage; inert when ``uri`` is empty or ``every`` is 0."""

    def __init__(self, uri: str | None, every: int, accelerator: Any, *, stage: str, keep: int = 2) -> None:
        if every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.uri = storage.check_uri(uri).rstrip("/") if uri else ""
        self.every = every
        self.accelerator = accelerator
        self.stage = stage
        self.keep = keep
        if self.enabled and getattr(accelerator, "distributed_type", None) == "FSDP":
            raise ValueError(
                "checkpoints under FSDP are not supported yet (the optimizer state is sharded): "
                "use DDP, or set checkpoint_every=0"
            )

    @property
    def enabled(self) -> bool:
        return bool(self.uri) and self.every > 0

    def due(self, step: int) -> bool:
        return self.enabled and step > 0 and step % self.every == 0

    def _uri(self, step: int) -> str:
        return f"{self.uri}/{PREFIX}{step:08d}"

    def complete(self) -> list[int]:
        """Steps of the complete checkpoints (manifest present), oldest first."""
        if not self.uri:
            return []
        steps = [s for s in map(_step_of, storage.list_dirs(self.uri)) if s is not None]
        return sorted(s for s in steps if storage.read_manifest(self._uri(s)) is not None)

    def save(
        self,
        step: int,
        *,
        modules: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, Any] | None = None,
        state: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> str:
        """Write the checkpoint of ``step`` (main process; all processes must call it), then prune old ones.

        A state whose trainable weights or optimiser state are not finite is refused (NonFiniteStateError) before
        anything is written: a checkpoint is always a state training can resume from.
        """
        from accelerate.utils import gather_object

        unwrapped = {name: self.accelerator.unwrap_model(module) for name, module in modules.items()}
        try:
            check_finite_state(unwrapped, optimizers)
        except NonFiniteStateError as err:
            complete = self.complete()
            newest = self._uri(complete[-1]) if complete else "none"
            raise NonFiniteStateError(
                f"{self.stage}: the state of step {step} is not saved: {err}; the newest complete checkpoint is "
                f"{newest}"
            ) from None
        rngs = gather_object([_rng_state()])  # every process's random state, in rank order
        uri = self._uri(step)
        if self.accelerator.is_main_process:
            with tempfile.TemporaryDirectory(prefix="preftune-ckpt-") as tmp:
                root = Path(tmp)
                (root / "modules").mkdir()
                (root / "optimizers").mkdir()
                (root / "schedulers").mkdir()
                for name, module in modules.items():
                    save_file(
                        _trainable(self.accelerator.unwrap_model(module)),
                        root / "modules" / f"{name}.safetensors",
                    )
                for name, optimizer in optimizers.items():
                    torch.save(optimizer.state_dict(), root / "optimizers" / f"{name}.pt")
                for name, scheduler in (schedulers or {}).items():
                    torch.save(scheduler.state_dict(), root / "schedulers" / f"{name}.pt")
                if tensors:
                    save_file(
                        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                        root / "tensors.safetensors",
                    )
                rng = {"processes": rngs}
                (root / "rng.json").write_text(json.dumps(rng), encoding="utf-8")
                meta = {"stage": self.stage, "step": step, "world_size": self.accelerator.num_processes}
                (root / "state.json").write_text(
                    json.dumps({**meta, "state": state}, default=float), encoding="utf-8"
                )
                storage.upload_dir(root, uri)  # the manifest goes last: only now is the checkpoint complete
            for old in self.complete()[: -self.keep]:
                storage.remove_tree(self._uri(old))
        self.accelerator.wait_for_everyone()
        return uri

    def verify(self, uri: str) -> None:
        """Read a written checkpoint back: complete (its manifest) and every saved weight finite, or raise."""
        if not self.accelerator.is_main_process:
            return
        with tempfile.TemporaryDirectory(prefix="preftune-verify-") as tmp:
            root = storage.download(uri, tmp, require_manifest=True)
            for path in sorted((root / "modules").glob("*.safetensors")):
                bad = _first_nonfinite(load_file(path))
                if bad is not None:
                    raise NonFiniteStateError(f"{uri}: the saved weight {bad} of {path.stem} is not finite")

    def restore(
        self,
        *,
        modules: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        schedulers: Mapping[str, Any] | None = None,
    ) -> Restored | None:
        """Load the newest complete checkpoint into the given objects; None when there is none to resume."""
        if not self.enabled:
            return None
        steps = self.complete()
        if not steps:
            return None
        uri = self._uri(steps[-1])
        with tempfile.TemporaryDirectory(prefix="preftune-resume-") as tmp:
            root = storage.download(uri, tmp, require_manifest=True)
            saved = json.loads((root / "state.json").read_text(encoding="utf-8"))
            if saved.get("stage") != self.stage:
                raise ValueError(f"{uri} is a {saved.get('stage')!r} checkpoint, not {self.stage!r}")
            if saved.get("world_size") != self.accelerator.num_processes:
                raise ValueError(
                    f"{uri} was written by {saved.get('world_size')} processes; this run has "
                    f"{self.accelerator.num_processes}: resume with the same number, or use a new checkpoint_uri"
                )
            for name, module in modules.items():
                weights = load_file(root / "modules" / f"{name}.safetensors")
                own = dict(self.accelerator.unwrap_model(module).named_parameters())
                missing = [n for n, p in own.items() if p.requires_grad and n not in weights]
                unknown = [n for n in weights if n not in own]
                if missing or unknown:
                    raise ValueError(
                        f"{uri}: the {name} checkpoint does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unknown[:3]}): was it written with other LoRA settings?"
                    )
                with torch.no_grad():
                    for n, value in weights.items():
                        own[n].copy_(value.to(own[n].device, own[n].dtype))
            for name, optimizer in optimizers.items():
                optimizer.load_state_dict(torch.load(root / "optimizers" / f"{name}.pt", weights_only=True))
            for name, scheduler in (schedulers or {}).items():
                scheduler.load_state_dict(torch.load(root / "schedulers" / f"{name}.pt", weights_only=True))
            tensors_file = root / "tensors.safetensors"
            tensors = load_file(tensors_file) if tensors_file.is_file() else {}
            rngs = json.loads((root / "rng.json").read_text(encoding="utf-8"))["processes"]
            _set_rng_state(rngs[self.accelerator.process_index])
        return Restored(step=int(saved["step"]), uri=uri, state=saved["state"], tensors=tensors)


def default_checkpoint_uri(model_uri: str) -> str:
    """Where a training step keeps its checkpoints when none is given: next to its model output.

    A KFP task keeps its output URIs when it is retried, so the retried pod finds the checkpoints there.
    """
    return model_uri.rstrip("/") + "-checkpoints"
