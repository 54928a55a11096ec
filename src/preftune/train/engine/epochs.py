"""The epoch loop: epochs of shuffled batches, an optimiser step every ``gradient_accumulation_steps`` batches.

SFT, the reward model and DPO (next: KTO) train this way. A stage supplies an :class:`EpochTrainer` (its loss,
its evaluation, what it logs) and calls :func:`fit`; the loop does the rest, in this order for every batch:
fingerprint the batch, loss (under the run's autocast), the NaN stop, backward, clipping, the stop on non-finite
gradients (before they are applied) and the optimiser (through accelerate's accumulation); and after every
optimiser step: the running means of its batches, the schedule, the logging window, snapshots, periodic
evaluation and checkpoints. Every epoch ends with an evaluation. A trainer with a ``stop_rule`` stops early and
ends with its best weights (preftune.train.engine.stopping).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from preftune.config.shared import learning_rate_of
from preftune.train.engine.services import (
    Engine,
    Halt,
    Run,
    batch_tokens,
    chain_digest,
    clip_and_measure,
    finite_everywhere,
    retarget_learning_rate,
)
from preftune.train.engine.state import EpochState, Resumable
from preftune.train.engine.stopping import EarlyStopping, StopRule
from preftune.train.loop import Meter, make_scheduler, plan_steps


@dataclass
class Loss:
    """One batch's loss for backward, and what to log about the batch (weighted means over a window/epoch)."""

    loss: torch.Tensor
    values: dict[str, float]
    weight: float


class EpochTrainer:
    """What a stage trained in epochs supplies to :func:`fit`; subclass it and fill in the two methods.

    ``name`` keys its model, optimiser and schedule in a checkpoint; ``state``, when set, is the trainer's own
    resumable state (saved with the loop's own); ``stop_rule``, when set, stops training early on its held-out
    metric and restores the best weights at the end.
    """

    name: str = "model"
    state: Resumable | None = None
    stop_rule: StopRule | None = None

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Loss:
        """The batch's loss (what backward runs on) and its logged values, gathered over every process."""
        raise NotImplementedError

    def evaluate(self, model: Any) -> dict[str, float]:
        """Held-out metrics of the model now (the loop restores train mode afterwards if needed)."""
        raise NotImplementedError

    def first_evaluation(self, model: Any) -> dict[str, float]:
        """The step-0 evaluation of a fresh run (not of a resumed one: that comes back with the history)."""
        return self.evaluate(model)

    def observe(self, step: int, loss: Loss) -> None:
        """Called for every batch once its optimiser step is done, with the steps done before it (e.g. DPO's
        first-step loss)."""

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after a logging window."""
        return {"loss": f"{logged['loss']:.4f}"}


def fit(
    engine: Engine, trainer: EpochTrainer, *, model: Any, optimizer: Any, loader: Any, generator: Any
) -> Run:
    """Train ``model`` with ``trainer``'s loss over ``loader`` (prepared by the engine's accelerator, shuffled
    by ``generator``) for ``epochs`` or ``max_steps``, resuming from the newest checkpoint when there is one."""
    config = engine.config
    total = plan_steps(len(loader), config.gradient_accumulation_steps, config.epochs, config.max_steps)
    scheduler = make_scheduler(optimizer, total, config.warmup_ratio)
    return _EpochLoop(engine, trainer, model, optimizer, scheduler, loader, generator, total).run()


class _EpochLoop:
    def __init__(
        self,
        engine: Engine,
        trainer: EpochTrainer,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        loader: Any,
        generator: torch.Generator,
        total: int,
    ) -> None:
        self.engine, self.trainer, self.config = engine, trainer, engine.config
        self.accelerator = engine.accelerator
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.generator, self.total = loader, generator, total
        name = trainer.name
        self.objects = {
            "modules": {name: model},
            "optimizers": {name: optimizer},
            "schedulers": {name: scheduler},
        }
        self.state = EpochState(epoch_start=generator.get_state().tolist())
        self.snapshots = engine.snapshots(total, model)
        self.skip = 0  # batches of the current epoch consumed before a resume
        # the fingerprint and token count including the batches of an unfinished accumulation window
        self.pending, self.pending_tokens = "", 0
        self.window: list[Loss] = []  # the losses of an unfinished accumulation window
        self.resumed_from = 0
        rule = trainer.stop_rule
        self.stopping = EarlyStopping(rule, self.state.best) if rule is not None else None
        self.stopped = False  # by the stop rule
        self.last_norm: float | None = None  # the last step's gradient norm, for live tracking
        self.mark = (time.perf_counter(), 0)  # when the logging window began, and the tokens by then

    def run(self) -> Run:
        self._start()
        self.bar = self.engine.progress(self.total, self.state.step)
        self.model.train()
        began = time.perf_counter()
        self.mark = (began, self.state.tokens)
        while self.state.step < self.total and not self.stopped:
            self._epoch()
        self.bar.close()
        run = Run(self.state, self.resumed_from, time.perf_counter() - began)
        return self._finish(run)

    def _finish(self, run: Run) -> Run:
        """With a stop rule: the best weights back in the model, and their evaluation as the run's final one."""
        run.stopped_early = self.stopped
        if self.stopping is None:
            return run
        run.best_step = self.state.best.step
        if self.stopping.restore(self.accelerator.unwrap_model(self.model), self.state.step):
            run.final_eval = self._evaluate()
            self.model.train()
        return run

    def _observe(self, step: int, epoch: float, values: dict[str, float]) -> None:
        """Log an evaluation and show it to the stop rule (which may end training here)."""
        self.state.history.log_eval(step, epoch, values)
        if self.stopping is not None and self.stopping.observe(
            step, values, self.accelerator.unwrap_model(self.model)
        ):
            self.stopped = True

    def _start(self) -> None:
        state = self.state
        if not self.engine.resume(self.objects, state, self.trainer.state):
            self.snapshots.keep_until(0)
            self._observe(0, 0.0, self._evaluate(first=True))
            return
        if self.stopping is not None:
            self.stopping.load(self.engine.resumed_tensors)
        retarget_learning_rate(self.optimizer, learning_rate_of(self.config), self.scheduler)
        self.resumed_from = state.step
        self.snapshots.keep_until(state.step)
        # the saved epoch starts again, without the batches it had consumed
        self.skip, state.epoch = state.batch, state.epoch - 1
        self.pending, self.pending_tokens = state.data_order, state.tokens
        self.generator.set_state(torch.tensor(state.epoch_start, dtype=torch.uint8))

    def _epoch(self) -> None:
        state = self.state
        fresh = self.skip == 0
        state.epoch += 1
        state.epoch_start = self.generator.get_state().tolist()  # before the loader draws this epoch's order
        skip, self.skip = self.skip, 0
        source = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        for number, batch in enumerate(source, start=skip + 1):
            if number == 1 and fresh:
                state.epoch_meter = Meter()
            if self._batch(number, batch) and self._stepped(number):
                break
        if not self.stopped:
            self._observe(state.step, state.epoch, self._evaluate())

    def _batch(self, number: int, batch: dict[str, torch.Tensor]) -> bool:
        """Forward and backward of one batch; True when it completed an optimiser step."""
        self.pending = chain_digest(self.pending, batch["input_ids"])
        self.pending_tokens += batch_tokens(batch)
        accelerator, config = self.accelerator, self.config
        with accelerator.accumulate(self.model):
            with self.engine.autocast():
                out = self.trainer.compute_loss(self.model, batch)
            self._check_finite(out.loss, number)
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                norm, stop = clip_and_measure(
                    accelerator, list(self.model.parameters()), config.max_grad_norm
                )
                if stop:
                    self._stop_on_gradients(norm, out.loss, number)
                self.last_norm = norm
            self.optimizer.step()
            self.optimizer.zero_grad()
        self.window.append(out)
        return bool(accelerator.sync_gradients)

    def _live(self) -> dict[str, float]:
        """Throughput of the logging window (this process's tokens per second) and the last gradient norm."""
        now, (began, tokens) = time.perf_counter(), self.mark
        self.mark = (now, self.state.tokens)
        live = {"tokens_per_second": (self.state.tokens - tokens) / max(now - began, 1e-9)}
        if self.last_norm is not None:
            live["grad_norm"] = float(self.last_norm)
        return live

    def _stepped(self, number: int) -> bool:
        """After an optimiser step: schedule, logs, snapshot, evaluation, checkpoint. True when training is done."""
        state, config = self.state, self.config
        for out in self.window:  # the window's batches count once its step is done (a NaN stop drops them)
            state.window.add(out.weight, **out.values)
            state.epoch_meter.add(out.weight, **out.values)
            self.trainer.observe(state.step, out)
        self.window = []
        self.scheduler.step()
        state.step += 1
        state.data_order, state.tokens = self.pending, self.pending_tokens
        step = state.step
        self.bar.update(1)
        if step % config.logging_steps == 0 or step == self.total:
            logged = state.window.means()
            state.history.log_train(step, {**logged, "lr": self.scheduler.get_last_lr()[0]}, self._live())
            self.bar.set_postfix(**self.trainer.postfix(logged))
            state.window = Meter()
        if self.snapshots.due(step):
            values = state.history.train[-1] if state.history.train else None
            self.engine.snapshot(self.snapshots, step, self.model, values)
        if step >= self.total:
            return True
        if config.eval_steps > 0 and step % config.eval_steps == 0 and number < len(self.loader):
            epoch = state.epoch - 1 + number / len(self.loader)
            self._observe(step, epoch, self._evaluate())
            if self.stopped:
                return True
        if self.engine.checkpointer.due(step):
            self._save(number)
        return False

    def _evaluate(self, first: bool = False) -> dict[str, float]:
        with self.engine.autocast():
            if first:
                return self.trainer.first_evaluation(self.model)
            return self.trainer.evaluate(self.model)

    def _save(self, batch: int) -> str:
        self.state.batch = batch
        tensors = self.stopping.tensors() if self.stopping is not None else None
        return self.engine.save_checkpoint(self.objects, self.state, self.trainer.state, tensors)

    def _check_finite(self, loss: torch.Tensor, number: int) -> None:
        """Stop with a clear error on a NaN or infinite loss, after checkpointing the last good step."""
        if finite_everywhere(loss, self.accelerator):
            return
        value = float(loss.detach().float().mean())
        where = f"the loss is {value}"
        self._halt(
            where,
            number,
            "Lower the learning rate, check the data of this batch, or use bf16/fp32 instead of fp16",
        )

    def _stop_on_gradients(self, norm: float, loss: torch.Tensor, number: int) -> None:
        """Stop before the optimiser applies non-finite gradients (their norm is ``norm``), after checkpointing
        the last good step: the weights are still those of that step."""
        self.optimizer.zero_grad()
        value = float(loss.detach().float().mean())
        where = f"the gradients are not finite (norm {norm}) though the loss ({value:.6g}) is"
        advice = "Lower the learning rate (or set max_grad_norm), or use bf16/fp32 instead of fp16"
        self._halt(where, number, advice, note=", and the step was not applied")

    def _halt(self, what: str, number: int, advice: str, note: str = "") -> None:
        state = self.state
        where = f"{self.engine.stage}: {what} at step {state.step + 1} (epoch {state.epoch}, batch {number}){note}"
        # the batches since the last optimiser step are replayed on resume, so the position is the window's start
        done = number - 1 - (number - 1) % self.config.gradient_accumulation_steps
        halt = Halt(where, f"the last good state (step {state.step}) is saved", advice)
        self.engine.halt(halt, lambda: self._save(done))
