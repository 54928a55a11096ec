"""What every training loop needs besides its objective: devices, checkpoints, the NaN stop, progress, snapshots,
accounting and the final save. One :class:`Engine` per run; both loop shapes (preftune.train.engine.epochs and
preftune.train.engine.iterations) use it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from tqdm.auto import tqdm

from preftune.model import modeling
from preftune.report import html as reports
from preftune.train.checkpoint import Checkpointer
from preftune.train.engine.state import LoopState, Resumable
from preftune.train.loop import History, make_accelerator, progress, resource_metrics
from preftune.train.snapshots import Snapshots

log = logging.getLogger(__name__)

#: A checkpoint's trained objects: ``{"modules": {...}, "optimizers": {...}, "schedulers": {...}}`` by name.
Objects = Mapping[str, Mapping[str, Any]]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good state was checkpointed first."""


def finite_everywhere(loss: torch.Tensor, accelerator: Any) -> bool:
    """True when the loss is finite on every process (all of them take the same branch afterwards)."""
    bad = (~torch.isfinite(loss.detach())).any().float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return not bool(bad)


def chain_digest(previous: str, data: torch.Tensor) -> str:
    """The data-order fingerprint after one more batch: sha256 over the previous digest and the batch's ids."""
    tensor = data.detach().cpu().contiguous()
    return hashlib.sha256(previous.encode("ascii") + tensor.numpy().tobytes()).hexdigest()


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a training batch: a packed batch counts its own, a padded one its mask."""
    if "tokens" in batch:
        return int(batch["tokens"])
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


@dataclass
class Halt:
    """Why a run stops on a non-finite loss: where it happened, what the checkpoint holds, what to try."""

    where: str
    saved: str  # e.g. "the last good state (step 3) is saved"
    advice: str


@dataclass
class Artifact:
    """What a run saves and where: the model artifact with its lineage and report, and its snapshots."""

    tokenizer: Any
    model_dir: str
    report_path: str
    parent_uri: str
    parameters: dict[str, Any]
    artifact_uri: str | None = None
    snapshot_dir: str | None = None
    snapshots: int = 0


@dataclass
class Run:
    """A finished loop: its final state, the step it resumed from (0 = a fresh start) and its seconds."""

    state: LoopState
    resumed_from: int = 0
    seconds: float = 0.0

    @property
    def history(self) -> History:
        return self.state.history


class Engine:
    """The services of one training run.

    Created first thing in a stage: it seeds Python, NumPy and torch, opens the Accelerator (one process, or one rank of
    a torchrun job) and the Checkpointer. ``config`` is the stage's config; the engine reads ``seed``,
    ``mixed_precision``, ``checkpoint_uri``, ``checkpoint_every`` and, when present,
    ``gradient_accumulation_steps``; the epoch loop reads its schedule fields too.
    """

    def __init__(self, stage: str, config: Any) -> None:
        self.began = time.perf_counter()
        self.stage = stage
        self.config = config
        modeling.set_seed(config.seed)
        accumulation = getattr(config, "gradient_accumulation_steps", 1)
        self.accelerator = make_accelerator(config.mixed_precision, accumulation)
        self.checkpointer = Checkpointer(
            config.checkpoint_uri, config.checkpoint_every, self.accelerator, stage=stage
        )
        self.artifact: Artifact | None = None

    def progress(self, total: int, done: int = 0) -> tqdm:
        bar = progress(total, self.stage, self.accelerator)
        bar.update(done)
        return bar

    # ------------------------------------------------------------------------------------ checkpoints

    def resume(self, objects: Objects, state: LoopState, extra: Resumable | None) -> bool:
        """Load the newest checkpoint into the objects and the states; False when there is none (a fresh run)."""
        restored = self.checkpointer.restore(**objects)
        if restored is None:
            return False
        if "loop" not in restored.state:
            raise ValueError(
                f"{restored.uri} was written by an older preftune, before the training engine: resume it with that "
                "version, or use a new checkpoint_uri"
            )
        state.load_state_dict(restored.state["loop"])
        if extra is not None:
            extra.load_state_dict(restored.state["trainer"])
        log.info("%s: resumed from %s (step %d)", self.stage, restored.uri, restored.step)
        return True

    def save_checkpoint(self, objects: Objects, state: LoopState, extra: Resumable | None) -> str:
        """Checkpoint the objects and both states at ``state.step`` (every process must call it)."""
        saved = {"loop": state.state_dict(), "trainer": extra.state_dict() if extra is not None else {}}
        return self.checkpointer.save(state.step, **objects, state=saved)

    def halt(self, halt: Halt, save: Callable[[], str]) -> NoReturn:
        """Stop on a non-finite loss: checkpoint the last good state (when there is a checkpoint_uri), then raise."""
        if not self.checkpointer.uri:
            raise NonFiniteLossError(f"{halt.where}; no checkpoint_uri is set, so nothing was saved")
        uri = save()
        raise NonFiniteLossError(f"{halt.where}; {halt.saved} in {uri}. {halt.advice}")

    # ------------------------------------------------------------------------------------ artifacts

    def snapshots(self, total: int) -> Snapshots:
        """The snapshot plan of a run of ``total`` steps (inert without a snapshot directory)."""
        artifact = self.artifact
        directory = artifact.snapshot_dir if artifact and self.accelerator.is_main_process else None
        return Snapshots(directory, total, artifact.snapshots if artifact else 0, stage=self.stage)

    def snapshot(self, snapshots: Snapshots, step: int, model: Any, values: dict[str, float] | None) -> None:
        artifact = self._artifact()
        snapshots.save(
            step,
            self.accelerator.unwrap_model(model),
            artifact.tokenizer,
            parent_uri=artifact.parent_uri,
            parameters=artifact.parameters,
            values=values,
        )

    def resources(self, tokens: int) -> dict[str, float]:
        """Seconds since the engine started, peak memory, and the tokens every process trained on."""
        return resource_metrics(self.began, self.accelerator, tokens)

    def save(
        self,
        model: Any,
        run: Run,
        *,
        data: dict[str, str],
        metrics: dict[str, float],
        report: Callable[[], str],
    ) -> None:
        """Save the trained model as the run's artifact (lineage with the data order) and write its report."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        artifact = self._artifact()
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.eval()
        modeling.save_model(
            unwrapped,
            artifact.tokenizer,
            artifact.model_dir,
            stage=self.stage,
            parent_uri=artifact.parent_uri,
            parameters=artifact.parameters,
            data={**data, "data_order": run.state.data_order},
            metrics=metrics,
            artifact_uri=artifact.artifact_uri,
        )
        reports.write(artifact.report_path, report())

    def _artifact(self) -> Artifact:
        if self.artifact is None:
            raise RuntimeError(f"{self.stage}: set engine.artifact before training")
        return self.artifact
