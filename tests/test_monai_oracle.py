"""MONAI as an independent oracle: the Tversky loss (alpha on FP, beta on FN, counts pooled over
the batch) and HD95 (the larger of the two directed 95th-percentile surface distances) agree
with MONAI's own implementations on random inputs."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from prostate_seg.inference.metrics import hd95
from prostate_seg.losses import TverskyLoss

monai = pytest.importorskip("monai", reason="MONAI is the optional extra [monai]")


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.85])
def test_tversky_loss_is_monais_with_batch_pooled_counts(alpha):
    generator = torch.Generator().manual_seed(int(alpha * 100))
    logits = torch.randn(3, 1, 16, 16, generator=generator) * 3
    target = (torch.rand(3, 1, 16, 16, generator=generator) > 0.7).float()
    target[1] = 0  # an empty slice: pooled counts keep the ratio defined
    oracle = monai.losses.TverskyLoss(sigmoid=True, alpha=alpha, beta=1 - alpha, batch=True,
                                      smooth_nr=1.0, smooth_dr=1.0)
    assert TverskyLoss(alpha=alpha)(logits, target).item() == pytest.approx(
        oracle(logits, target).item(), abs=1e-6)
    # swapping alpha and beta changes the loss: the weights are not symmetric in the test data
    swapped = monai.losses.TverskyLoss(sigmoid=True, alpha=1 - alpha, beta=alpha, batch=True,
                                       smooth_nr=1.0, smooth_dr=1.0)(logits, target).item()
    if alpha != 0.5:
        assert abs(swapped - TverskyLoss(alpha=alpha)(logits, target).item()) > 1e-3


def _blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.52


@pytest.mark.parametrize("seed", range(4))
def test_hd95_is_monais_on_random_volumes_with_anisotropic_spacing(seed):
    rng = np.random.default_rng(seed)
    pred, truth = _blob(rng, (12, 40, 40)), _blob(rng, (12, 40, 40))
    assert pred.any() and truth.any()
    spacing = (3.0, 0.6, 0.6)
    oracle = monai.metrics.compute_hausdorff_distance(
        torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
        percentile=95, spacing=spacing).item()
    assert hd95(pred, truth, spacing) == pytest.approx(oracle, rel=1e-5)
