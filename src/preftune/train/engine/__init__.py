"""One training engine for every stage: the loops, and the services around them.

- :class:`Engine` (services.py): one per run. Accelerate (devices, mixed precision, DDP), seeding, checkpoints
  and resume, the NaN stop, progress, snapshots, token and resource accounting, the final save with lineage and
  report.
- Two loop shapes use it. :func:`fit` (epochs.py): epochs of batches, for SFT, the reward model and DPO; a
  trainer supplies an :class:`EpochTrainer` (``compute_loss``, ``evaluate``). :func:`run_iterations`
  (iterations.py): RL iterations, for PPO; a trainer supplies an :class:`IterationTrainer` (``collect``,
  ``update``).
- Resumable state is a dataclass (state.py): the loop's own and, optionally, the trainer's; both are saved whole.

A new trainer is a class implementing one of the two trainer interfaces, plus a short driver that loads its
data and models, builds the Engine first, and hands both to a loop.
"""

from preftune.train.engine.epochs import EpochTrainer, Loss, fit
from preftune.train.engine.iterations import Experience, IterationTrainer, run_iterations
from preftune.train.engine.services import (
    Artifact,
    Engine,
    Halt,
    NonFiniteLossError,
    Run,
    batch_tokens,
    chain_digest,
    checked_gradient_groups,
    checked_gradients,
    finite_everywhere,
    step_optimizers,
)
from preftune.train.engine.state import BestSoFar, EpochState, LoopState, Resumable
from preftune.train.engine.stopping import EarlyStopping, StopRule

__all__ = [
    "Artifact",
    "BestSoFar",
    "EarlyStopping",
    "Engine",
    "EpochState",
    "EpochTrainer",
    "Experience",
    "Halt",
    "IterationTrainer",
    "LoopState",
    "Loss",
    "NonFiniteLossError",
    "Resumable",
    "Run",
    "StopRule",
    "batch_tokens",
    "chain_digest",
    "checked_gradient_groups",
    "checked_gradients",
    "finite_everywhere",
    "fit",
    "run_iterations",
    "step_optimizers",
]
