"""preftune.model.losses against arithmetic done by hand, and against TRL's DPO loss on random batches."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.model.losses import dpo_loss, sequence_logprobs, token_logprobs

LN2 = math.log(2)  # 0.693147...


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- sequence_logprobs -----------------------------------------------------------------------------------------


def test_sequence_logprobs_by_hand() -> None:
    # Position 0: logits [0, 0, ln 2] -> probabilities [1/4, 1/4, 1/2]; label 2 -> log(1/2) = -0.693147.
    # Position 1: logits [0, 0, 0] -> probabilities [1/3, 1/3, 1/3]; label 0 -> log(1/3) = -1.098612.
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0]])
    assert token_logprobs(logits, labels).tolist()[0] == pytest.approx([-LN2, -math.log(3)], abs=1e-6)
    # Both tokens counted: -0.693147 - 1.098612 = -1.791759 = log(1/6).
    assert float(sequence_logprobs(logits, labels, torch.tensor([[1, 1]]))[0]) == pytest.approx(
        -math.log(6), abs=1e-6
    )
    # Only the second (a prompt token is masked out): -1.098612.
    assert float(sequence_logprobs(logits, labels, torch.tensor([[0, 1]]))[0]) == pytest.approx(
        -math.log(3), abs=1e-6
    )


def test_sequence_logprobs_matches_log_softmax_and_ignores_masked_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.3).long()
    naive = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected = (naive * mask).sum(-1)
    assert torch.allclose(sequence_logprobs(logits, labels, mask), expected, atol=1e-5)
    # -100 labels (the usual ignore index) neither crash the gather nor contribute.
    ignored = labels.masked_fill(mask == 0, -100)
    assert torch.allclose(sequence_logprobs(logits, ignored, mask), expected, atol=1e-5)
    # bf16 logits are upcast: the result is float32 and close to the fp32 answer on the same rounded logits.
    half = logits.bfloat16()
    out = sequence_logprobs(half, labels, mask)
    assert out.dtype == torch.float32
    assert torch.allclose(out, sequence_logprobs(half.float(), labels, mask), atol=1e-5)


def test_sequence_logprobs_gradient_flows_to_logits() -> None:
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    sequence_logprobs(logits, torch.tensor([[0]]), torch.tensor([[1]])).sum().backward()
    # d/dx0 log softmax(x)_0 = 1 - p0 = 1/2 and d/dx1 = -p1 = -1/2 at x = 0.
    assert logits.grad.flatten().tolist() == pytest.approx([0.5, -0.5])


# --- dpo_loss ----------------------------------------------------------------------------------------------------

# A worked pair: policy chosen -10, rejected -12; reference -11 for both, beta = 0.1.
# chosen log-ratio = -10 - (-11) = +1, rejected log-ratio = -12 - (-11) = -1, so h = 1 - (-1) = 2, beta*h = 0.2.
PAIR = (t(-10.0), t(-12.0), t(-11.0), t(-11.0))


def test_sigmoid_at_zero_is_ln2() -> None:
    # Policy == reference: h = 0, loss = -log sigmoid(0) = -log(1/2) = ln 2; both rewards 0.
    x = t(-5.0, -7.5)
    losses, chosen, rejected = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert losses.tolist() == pytest.approx([LN2, LN2], abs=1e-7)
    assert chosen.tolist() == [0.0, 0.0] and rejected.tolist() == [0.0, 0.0]


def test_sigmoid_worked_pair() -> None:
    # -log sigmoid(0.2) = log(1 + e^-0.2) = log(1 + 0.818730753) = log(1.818730753) = 0.598138869.
    losses, chosen, rejected = dpo_loss(*PAIR, beta=0.1)
    assert float(losses[0]) == pytest.approx(0.598138869, abs=1e-6)
    # Implicit rewards: beta * log-ratio = 0.1 * (+1) and 0.1 * (-1).
    assert float(chosen[0]) == pytest.approx(0.1) and float(rejected[0]) == pytest.approx(-0.1)


def test_sigmoid_label_smoothing() -> None:
    # eps = 0.1: -(0.9) log sigmoid(0.2) - 0.1 log sigmoid(-0.2).
    # log sigmoid(-0.2) = -log(1 + e^0.2) = -log(2.221402758) = -0.798138869.
    # 0.9 * 0.598138869 + 0.1 * 0.798138869 = 0.538324982 + 0.079813887 = 0.618138869.
    losses, _, _ = dpo_loss(*PAIR, beta=0.1, label_smoothing=0.1)
    assert float(losses[0]) == pytest.approx(0.618138869, abs=1e-6)
    # Smoothing does not move the h = 0 value: 0.9 ln 2 + 0.1 ln 2 = ln 2.
    z = t(-3.0)
    assert float(dpo_loss(z, z, z, z, beta=0.1, label_smoothing=0.3)[0][0]) == pytest.approx(LN2, abs=1e-7)


def test_ipo_values() -> None:
    # (h - 1/(2 beta))^2 with 1/(2 * 0.1) = 5.
    assert float(dpo_loss(*PAIR, beta=0.1, loss_type="ipo")[0][0]) == pytest.approx(9.0)  # (2 - 5)^2
    z = t(-4.0)
    assert float(dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo")[0][0]) == pytest.approx(25.0)  # (0 - 5)^2
    # h = 5 hits the target exactly: policy chosen +3 over the reference, rejected -2.
    assert float(dpo_loss(t(-8.0), t(-13.0), t(-11.0), t(-11.0), beta=0.1, loss_type="ipo")[0][0]) == 0.0
    # beta = 0.5 -> target 1; h = 2 -> (2 - 1)^2 = 1.
    assert float(dpo_loss(*PAIR, beta=0.5, loss_type="ipo")[0][0]) == pytest.approx(1.0)


def test_hinge_values() -> None:
    assert float(dpo_loss(*PAIR, beta=0.1, loss_type="hinge")[0][0]) == pytest.approx(0.8)  # 1 - 0.1 * 2
    # h = 20 -> 1 - 2 < 0 -> 0; h = -10 -> 1 + 1 = 2.
    assert float(dpo_loss(t(0.0), t(-20.0), t(0.0), t(0.0), beta=0.1, loss_type="hinge")[0][0]) == 0.0
    assert float(
        dpo_loss(t(-10.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="hinge")[0][0]
    ) == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("loss_type", "d_chosen"),
    [
        # sigmoid: d/dc -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -0.1 * 0.5 at h = 0.
        ("sigmoid", -0.05),
        # ipo: d/dc (h - 5)^2 = 2 (h - 5) = -10 at h = 0.
        ("ipo", -10.0),
        # hinge: d/dc relu(1 - beta h) = -beta = -0.1 while 1 - beta h > 0.
        ("hinge", -0.1),
    ],
)
def test_gradient_signs(loss_type: str, d_chosen: float) -> None:
    # Raising the chosen answer's log-prob lowers the loss, raising the rejected one's raises it, equally.
    chosen, rejected = t(-5.0).requires_grad_(), t(-6.0).requires_grad_()
    losses, chosen_reward, _ = dpo_loss(chosen, rejected, t(-5.0), t(-6.0), beta=0.1, loss_type=loss_type)
    losses.sum().backward()
    assert float(chosen.grad[0]) == pytest.approx(d_chosen, abs=1e-6)
    assert float(rejected.grad[0]) == pytest.approx(-d_chosen, abs=1e-6)
    assert not chosen_reward.requires_grad  # rewards are for logging only


def test_dpo_loss_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*PAIR, beta=0.1, loss_type="kto")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*PAIR, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(*PAIR, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(*PAIR, beta=0.1, loss_type="ipo", label_smoothing=0.1)


# --- against TRL (a test-only peer) ----------------------------------------------------------------------------


def _trl_dpo(pc, pr, rc, rr, beta: float, loss_type: str) -> tuple[torch.Tensor, dict]:
    """Run TRL's DPOTrainer._compute_loss on given sequence log-probs.

    The trainer's loss path takes a model and a batch; a stand-in model returns per-token log-probs of one
    completion token per sequence (so the token sum is the sequence log-prob itself and IPO's per-token
    normalisation divides by 1), and the reference log-probs go in precomputed, as TRL's own option allows.
    """
    trainer_module = pytest.importorskip("trl.trainer.dpo_trainer")
    logps = torch.cat([pc, pr]).unsqueeze(1)
    rows = logps.shape[0]

    def model(**_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True  # type: ignore[attr-defined]
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, 2, dtype=torch.long),
        "attention_mask": torch.ones(rows, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * rows),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    try:
        loss = trainer_module.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    except (AttributeError, TypeError, KeyError) as exc:  # TRL's internals changed shape
        pytest.skip(f"TRL's DPO loss path is not callable this way in this version: {exc}")
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_on_random_batches(loss_type: str, beta: float) -> None:
    g = torch.Generator().manual_seed(len(loss_type) * 100 + int(beta * 10))
    for _ in range(5):
        batch = [-40.0 + 8.0 * torch.randn(16, generator=g) for _ in range(4)]
        losses, chosen, rejected = dpo_loss(*batch, beta=beta, loss_type=loss_type)
        trl_loss, trl_metrics = _trl_dpo(*batch, beta=beta, loss_type=loss_type)
        assert float(losses.mean()) == pytest.approx(float(trl_loss), abs=1e-5)
        assert float(chosen.mean()) == pytest.approx(trl_metrics["rewards/chosen"][0], abs=1e-5)
        assert float(rejected.mean()) == pytest.approx(trl_metrics["rewards/rejected"][0], abs=1e-5)
        accuracy = float((chosen > rejected).float().mean())
        assert accuracy == pytest.approx(trl_metrics["rewards/accuracies"][0], abs=1e-6)
        # Per pair as well: one pair at a time through TRL.
        for i in range(3):
            one = [x[i : i + 1] for x in batch]
            assert float(losses[i]) == pytest.approx(
                float(_trl_dpo(*one, beta=beta, loss_type=loss_type)[0]), abs=1e-5
            )
