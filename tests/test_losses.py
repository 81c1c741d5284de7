"""Loss values against hand computation, and the alpha/beta convention (alpha weights FP)."""

import math
import re

import pytest
import torch

from prostate_seg.losses import (CombinedLoss, DiceLoss, FocalTverskyLoss, TverskyLoss,
                                 tversky_index)

# probabilities 0.9, 0.2, 0.7, 0.1 against targets 1, 0, 0, 1:
# TP = 0.9 + 0.1 = 1.0, FP = 0.2 + 0.7 = 0.9, FN = 0.1 + 0.9 = 1.0
PROBS = torch.tensor([0.9, 0.2, 0.7, 0.1])
TARGET = torch.tensor([1.0, 0.0, 0.0, 1.0])


def logits(probs: torch.Tensor) -> torch.Tensor:
    return torch.log(probs / (1 - probs)).reshape(1, 1, 2, 2)


def target() -> torch.Tensor:
    return TARGET.reshape(1, 1, 2, 2)


@pytest.mark.parametrize("alpha, expected", [(0.3, 1 - 1 / (1 + 0.3 * 0.9 + 0.7 * 1.0)),
                                             (0.7, 1 - 1 / (1 + 0.7 * 0.9 + 0.3 * 1.0))])
def test_tversky_matches_hand_computation(alpha, expected):
    loss = TverskyLoss(alpha=alpha, smooth=0.0)(logits(PROBS), target())
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_smooth_term_enters_numerator_and_denominator():
    loss = TverskyLoss(alpha=0.3, beta=0.7, smooth=1.0)(logits(PROBS), target())
    assert loss.item() == pytest.approx(1 - 2.0 / (2.0 + 0.27 + 0.7), abs=1e-6)


def test_beta_defaults_to_one_minus_alpha():
    assert TverskyLoss(alpha=0.25).beta == pytest.approx(0.75)
    assert TverskyLoss(alpha=0.25, beta=0.5).beta == 0.5


def test_alpha_penalises_false_positives_and_beta_false_negatives():
    base = torch.tensor([0.9, 0.1, 0.1, 0.9])  # right on all four pixels
    extra_fp = torch.tensor([0.9, 0.9, 0.9, 0.9])  # both background pixels called gland
    extra_fn = torch.tensor([0.1, 0.1, 0.1, 0.1])  # both gland pixels missed
    gland_target = torch.tensor([1.0, 0.0, 0.0, 1.0]).reshape(1, 1, 2, 2)

    def increase(alpha: float, worse: torch.Tensor) -> float:
        loss = TverskyLoss(alpha=alpha, smooth=0.0)
        return (loss(logits(worse), gland_target) - loss(logits(base), gland_target)).item()

    # More false positives hurt more when alpha (the FP weight) is larger ...
    assert increase(0.8, extra_fp) > increase(0.2, extra_fp) > 0
    # ... and more false negatives hurt more when beta = 1 - alpha is larger.
    assert increase(0.2, extra_fn) > increase(0.8, extra_fn) > 0


def test_dice_is_tversky_with_equal_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    y = (torch.rand(2, 1, 8, 8) > 0.6).float()
    probs, tgt = torch.sigmoid(x), y
    dice = 2 * (probs * tgt).sum() / (probs.sum() + tgt.sum())
    assert TverskyLoss(0.5, 0.5, smooth=0.0)(x, y).item() == pytest.approx(1 - dice.item(), abs=1e-6)
    assert DiceLoss(smooth=0.0)(x, y).item() == pytest.approx(1 - dice.item(), abs=1e-6)
    with pytest.raises(TypeError):  # no weight to choose: loss=dice loss.alpha=... is refused
        DiceLoss(alpha=0.3)


def test_counts_are_pooled_over_the_batch():
    """An empty slice next to a full one: pooled, not averaged per slice."""
    x = logits(torch.tensor([0.9, 0.9, 0.9, 0.9])).repeat(2, 1, 1, 1)
    y = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    tp, fp, fn = 3.6, 3.6, 0.4
    assert tversky_index(x, y, 0.5, 0.5, 0.0).item() == pytest.approx(
        tp / (tp + 0.5 * fp + 0.5 * fn), abs=1e-6)


def test_bf16_logits_are_summed_in_float32():
    x = torch.randn(4, 1, 64, 64)
    y = (torch.rand(4, 1, 64, 64) > 0.5).float()
    full = TverskyLoss(0.3)(x, y)
    half = TverskyLoss(0.3)(x.bfloat16(), y)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), abs=5e-3)


def test_combined_loss_is_the_weighted_sum():
    x, y = logits(PROBS), target()
    bce, tversky = torch.nn.BCEWithLogitsLoss(), TverskyLoss(0.3, smooth=0.0)
    combined = CombinedLoss({"bce": bce, "tversky": tversky}, {"bce": 0.5, "tversky": 2.0})
    expected = 0.5 * bce(x, y) + 2.0 * tversky(x, y)
    assert combined(x, y).item() == pytest.approx(expected.item(), abs=1e-6)
    bce_by_hand = -sum(math.log(p) if t else math.log(1 - p)
                       for p, t in zip(PROBS.tolist(), TARGET.tolist())) / 4
    assert bce(x, y).item() == pytest.approx(bce_by_hand, abs=1e-6)


@pytest.mark.parametrize("kwargs", [{"alpha": 1.5}, {"alpha": -0.1}, {"alpha": 0.5, "beta": 2}])
def test_weights_outside_unit_interval_are_refused(kwargs):
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
        TverskyLoss(**kwargs)


@pytest.mark.parametrize("loss, values, message", [
    ("TverskyLoss", {"alpha": 1.5}, "loss.alpha=1.5: must be a number in [0, 1]"),
    ("TverskyLoss", {"alpha": 0.2, "beta": -0.1}, "loss.beta=-0.1: must be a number in [0, 1]"),
    ("TverskyLoss", {"smooth": None}, "loss.smooth=null: must be >= 0"),
    ("FocalTverskyLoss", {"gamma": 0.0}, "loss.gamma=0.0: must be > 0"),
    ("CombinedLoss", {"terms": {"bce": None, "dice": None},
                      "weights": {"bce": 0.0, "dice": 0.0}},
     "loss.weights={bce: 0.0, dice: 0.0}: at least one must be > 0"),
    ("CombinedLoss", {"terms": {"bce": None}, "weights": {"bce": -1}},
     "loss.weights.bce=-1: must be >= 0"),
])
def test_a_loss_and_its_config_refuse_a_number_in_the_same_words(loss, values, message):
    """One rule: the class called from Python, and train's start-up check of a config."""
    from omegaconf import OmegaConf

    from prostate_seg import losses
    from prostate_seg.errors import ConfigError
    from prostate_seg.training.checks import check_loss

    arguments = dict(values)
    if "terms" in arguments:
        arguments["terms"] = {name: torch.nn.BCEWithLogitsLoss() for name in values["terms"]}
    with pytest.raises(ValueError, match=re.escape(message)):
        getattr(losses, loss)(**arguments)
    config = {"_target_": f"prostate_seg.losses.{loss}", **values}
    if "terms" in config:
        config["terms"] = {name: {"_target_": "torch.nn.BCEWithLogitsLoss"}
                           for name in values["terms"]}
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_loss(OmegaConf.create(config))


def test_combined_loss_needs_a_weight_per_term():
    with pytest.raises(ValueError, match="weights"):
        CombinedLoss({"bce": torch.nn.BCEWithLogitsLoss()}, {"dice": 1.0})


# Focal Tversky on the same four pixels (TP = 1.0, FP = 0.9, FN = 1.0), smooth = 0:
# alpha = 0.3, beta = 0.7: TI = 1 / 1.97 = 0.507614, 1 - TI = 0.492386.
@pytest.mark.parametrize("gamma, expected", [(4 / 3, 0.492386 ** 0.75),  # = 0.587800
                                             (2.0, 0.492386 ** 0.5),     # = 0.701702
                                             (1.0, 0.492386)])
def test_focal_tversky_matches_hand_computation(gamma, expected):
    loss = FocalTverskyLoss(alpha=0.3, gamma=gamma, smooth=0.0)(logits(PROBS), target())
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert FocalTverskyLoss(alpha=0.3, gamma=4 / 3, smooth=0.0)(
        logits(PROBS), target()).item() == pytest.approx(0.587800, abs=1e-5)


def test_focal_tversky_with_gamma_one_is_the_tversky_loss():
    torch.manual_seed(1)
    x, y = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert FocalTverskyLoss(0.4, gamma=1.0)(x, y).item() == pytest.approx(
        TverskyLoss(0.4)(x, y).item(), abs=1e-6)


def test_focal_tversky_maps_to_abraham_and_khan_with_alpha_and_beta_swapped():
    """Their code: TI = (TP + s) / (TP + 0.7 FN + 0.3 FP + s), loss = (1 - TI) ** 0.75."""
    tp, fp, fn, s = 1.0, 0.9, 1.0, 1.0
    theirs = (1 - (tp + s) / (tp + 0.7 * fn + 0.3 * fp + s)) ** 0.75
    ours = FocalTverskyLoss(alpha=0.3, beta=0.7, gamma=4 / 3, smooth=s)(logits(PROBS), target())
    assert ours.item() == pytest.approx(theirs, abs=1e-6)


def test_focal_tversky_gradient_stays_finite_on_a_perfect_prediction():
    y = target()
    x = ((y * 2 - 1) * 100).requires_grad_()  # sigmoid saturates: TI is exactly 1 in float32
    loss = FocalTverskyLoss(alpha=0.3, gamma=4 / 3)(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-4) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gamma", [0.0, -1.0])
def test_focal_tversky_refuses_a_gamma_that_is_not_positive(gamma):
    with pytest.raises(ValueError, match="loss.gamma"):
        FocalTverskyLoss(gamma=gamma)
