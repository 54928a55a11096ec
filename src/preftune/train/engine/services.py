"""What every training loop needs besides its objective: devices, checkpoints, the NaN stop, progress, snapshots,
accounting and the final save. One :class:`Engine` per run; both loop shapes (preftune.train.engine.epochs and
preftune.train.engine.iterations) use it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from tqdm.auto import tqdm

from preftune.model import modeling
from preftune.model.precision import precision_of
from preftune.report import html as reports
from preftune.train.checkpoint import Checkpointer, NonFiniteStateError, check_finite_state
from preftune.train.engine.state import LoopState, Resumable
from preftune.train.loop import History, make_accelerator, progress, resource_metrics
from preftune.train.snapshots import Snapshots, snapshot_count

log = logging.getLogger(__name__)

#: What every non-finite stop says: why a retry with the same settings cannot help.
DETERMINISTIC = "This failure is deterministic: a retry with the same settings stops here again"

#: A checkpoint's trained objects: ``{"modules": {...}, "optimizers": {...}, "schedulers": {...}}`` by name.
Objects = Mapping[str, Mapping[str, Any]]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss or gradient, and stopped before applying it; the last good state
    was checkpointed (and verified finite) first.

    Deterministic: the same settings stop at the same step again, so a retry with them cannot help; the message
    says what to change, and a rerun with the same checkpoint_uri resumes from the saved state.
    """

    deterministic = True


def finite_everywhere(loss: torch.Tensor, accelerator: Any) -> bool:
    """True when the loss is finite on every process (all of them take the same branch afterwards)."""
    bad = (~torch.isfinite(loss.detach())).any().float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return not bool(bad)


def gradient_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (after DDP's all-reduce every process has the same)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


def checked_gradients(
    accelerator: Any, parameters: list[torch.nn.Parameter], max_norm: float
) -> float | None:
    """Clip the gradients to ``max_norm`` (0 = no clipping) and return their norm when it is not finite, None
    when the optimiser may step.

    Under fp16 the gradient scaler already skips a step whose gradients overflowed (and lowers its scale), so
    None is returned there; otherwise a non-finite norm means the step must not be applied: clipping by an
    infinite norm would turn every gradient into 0 or NaN.
    """
    value, stop = clip_and_measure(accelerator, parameters, max_norm)
    return value if stop else None


def checked_gradient_groups(
    accelerator: Any, groups: list[list[torch.nn.Parameter]], max_norm: float
) -> list[float | None]:
    """:func:`checked_gradients` for the parameters of several optimisers stepped together (PPO's policy and
    critic), each group clipped on its own.

    accelerate's ``clip_grad_norm_`` unscales the gradients of every prepared optimiser on each call, and fp16's
    gradient scaler refuses a second unscale before the step. So under fp16 the gradients are unscaled once
    here and each group is clipped by torch directly; without a scaler each group goes through accelerate's own
    clipping (which FSDP and DeepSpeed need).
    """
    if getattr(accelerator, "scaler", None) is None:
        return [checked_gradients(accelerator, params, max_norm) for params in groups]
    accelerator.unscale_gradients()
    for params in groups:
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [None for _ in groups]  # the scaler skips a step whose gradients overflowed


def step_optimizers(accelerator: Any, optimizers: list[Any]) -> None:
    """Step optimisers whose gradients came from one backward (PPO's policy and critic).

    Under fp16 each of accelerate's optimisers steps through the shared gradient scaler and then updates it,
    which forgets that the next optimiser's gradients were already unscaled: the second would be unscaled twice
    (its update shrunk by the loss scale). So under fp16 all step through the scaler first and it is updated
    once; otherwise each steps as usual.
    """
    scaler = getattr(accelerator, "scaler", None)
    if scaler is None:
        for optimizer in optimizers:
            optimizer.step()
        return
    for optimizer in optimizers:
        # the torch optimiser under accelerate's wrapper, which would update the scaler itself
        scaler.step(getattr(optimizer, "optimizer", optimizer))
    scaler.update()


def clip_and_measure(
    accelerator: Any, parameters: list[torch.nn.Parameter], max_norm: float
) -> tuple[float, bool]:
    """:func:`checked_gradients` with the norm always returned (for live tracking): ``(norm, must stop)``."""
    norm = accelerator.clip_grad_norm_(parameters, max_norm) if max_norm > 0 else gradient_norm(parameters)
    value = float(torch.as_tensor(norm).float())
    if getattr(accelerator, "scaler", None) is not None:
        return value, False
    return value, not math.isfinite(value)


def retarget_learning_rate(optimizer: Any, learning_rate: float, scheduler: Any = None) -> None:
    """Put the configured peak learning rate in force after a resume (a checkpoint stores the one it ran with).

    A run stopped by a non-finite gradient is rerun with a lower learning rate from the same checkpoint_uri; the
    schedule keeps its position. A no-op when the rate is unchanged, so a plain resume is exact.
    """
    groups = optimizer.param_groups
    if scheduler is None:
        if any(g["lr"] != learning_rate for g in groups):
            log.info("learning rate %s -> %s after resume", groups[0]["lr"], learning_rate)
        for group in groups:
            group["lr"] = learning_rate
        return
    if all(base == learning_rate for base in scheduler.base_lrs):
        return
    log.info("peak learning rate %s -> %s after resume", scheduler.base_lrs[0], learning_rate)
    scheduler.base_lrs = [learning_rate] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


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
    """A finished loop: its final state, the step it resumed from (0 = a fresh start) and its seconds; with a
    stop rule, whether it stopped early, the step of the best evaluation and, when the best weights were put
    back, their evaluation (``final_eval``)."""

    state: LoopState
    resumed_from: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    best_step: int | None = None
    final_eval: dict[str, float] | None = None

    @property
    def last_eval(self) -> dict[str, float]:
        """The evaluation of the weights the run ends with."""
        return self.final_eval if self.final_eval is not None else self.state.history.eval[-1]

    @property
    def history(self) -> History:
        return self.state.history


class Engine:
    """The services of one training run.

    Created first thing in a stage: it seeds Python, NumPy and torch, opens the Accelerator (one process, or one rank of
    a torchrun job) and the Checkpointer. ``config`` is the stage's config; the engine reads ``seed``,
    ``precision`` (or the older ``mixed_precision``), ``checkpoint_uri``, ``checkpoint_every`` and, when present,
    ``gradient_accumulation_steps``; the epoch loop reads its schedule fields too.
    """

    def __init__(self, stage: str, config: Any) -> None:
        self.began = time.perf_counter()
        self.stage = stage
        self.config = config
        modeling.set_seed(config.seed)
        accumulation = getattr(config, "gradient_accumulation_steps", 1)
        self.precision = precision_of(config)
        self.accelerator = make_accelerator(self.precision.name, accumulation)
        self.checkpointer = Checkpointer(
            config.checkpoint_uri, config.checkpoint_every, self.accelerator, stage=stage
        )
        self.artifact: Artifact | None = None
        self.resumed_tensors: dict[str, torch.Tensor] = {}  # the extra tensors of the checkpoint resumed from

    def autocast(self) -> Any:
        """The context every forward of the run executes in: autocast in the compute dtype (none in fp32), so the
        LM head, losses and frozen models compute exactly as the prepared model's own forward does."""
        return self.accelerator.autocast()

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
        self.resumed_tensors = restored.tensors
        if extra is not None:
            extra.load_state_dict(restored.state["trainer"])
        log.info("%s: resumed from %s (step %d)", self.stage, restored.uri, restored.step)
        return True

    def save_checkpoint(
        self,
        objects: Objects,
        state: LoopState,
        extra: Resumable | None,
        tensors: Mapping[str, torch.Tensor] | None = None,
    ) -> str:
        """Checkpoint the objects, both states and any extra ``tensors`` at ``state.step`` (every process must
        call it)."""
        saved = {"loop": state.state_dict(), "trainer": extra.state_dict() if extra is not None else {}}
        return self.checkpointer.save(state.step, **objects, state=saved, tensors=tensors)

    def halt(self, halt: Halt, save: Callable[[], str]) -> NoReturn:
        """Stop on a non-finite loss or gradient: checkpoint the last good state (when there is a checkpoint_uri),
        read it back to verify that its weights are finite, and only then name it; then raise."""
        if not self.checkpointer.uri:
            raise NonFiniteLossError(
                f"{halt.where}; no checkpoint_uri is set, so nothing was saved. {DETERMINISTIC}. {halt.advice}"
            )
        try:
            uri = save()
            self.checkpointer.verify(uri)
        except NonFiniteStateError as err:
            raise NonFiniteLossError(
                f"{halt.where}; the state is not finite, so it was not saved ({err}). {DETERMINISTIC}. {halt.advice}"
            ) from None
        raise NonFiniteLossError(
            f"{halt.where}; {halt.saved} in {uri} (read back: its weights are finite). {DETERMINISTIC}. "
            f"{halt.advice}. A rerun with the same checkpoint_uri resumes from that state; one with a new "
            "checkpoint_uri starts afresh (for when the steps before this one already moved too far)"
        )

    # ------------------------------------------------------------------------------------ artifacts

    def snapshots(self, total: int, policy: Any = None) -> Snapshots:
        """The snapshot plan of a run of ``total`` steps (inert without a snapshot directory); ``policy`` (the
        trained model, when given) lets the count follow what a snapshot of it costs."""
        artifact = self.artifact
        directory = artifact.snapshot_dir if artifact and self.accelerator.is_main_process else None
        parameters = None if policy is None else sum(p.numel() for p in policy.parameters())
        use_lora = getattr(self.config, "use_lora", True)
        count = snapshot_count(artifact.snapshots, use_lora, parameters) if artifact else 0
        return Snapshots(directory, total, count, stage=self.stage)

    def snapshot(self, snapshots: Snapshots, step: int, model: Any, values: dict[str, float] | None) -> None:
        """Keep the policy of ``step`` for the reward-vs-KL chart, unless its weights are not finite."""
        artifact = self._artifact()
        unwrapped = self.accelerator.unwrap_model(model)
        try:
            check_finite_state({"policy": unwrapped}, {})
        except NonFiniteStateError as err:
            log.warning("%s: no snapshot of step %d: %s", self.stage, step, err)
            return
        snapshots.save(
            step,
            unwrapped,
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
        check_finite_state({"model": unwrapped}, {})  # never an artifact of NaN weights
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
