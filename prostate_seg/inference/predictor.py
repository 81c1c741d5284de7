"""A trained checkpoint on whole volumes, exactly as it saw data in validation (its own
validation transform and preprocessing), for evaluate (prepared slices) and predict (scans)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage
from torch import Tensor, nn

from prostate_seg.config import build, check_extras_installed
from prostate_seg.data.dataset import context_window
from prostate_seg.data.resize import fit_slice, unfit_slice
from prostate_seg.errors import ConfigError, DataError
from prostate_seg.files import not_found
from prostate_seg.settings import shown
from prostate_seg.data.prepare import PrepareSettings
from prostate_seg.models import network_weights, weights_mismatch


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU where there is one; ``cpu``, ``cuda``, ``cuda:N``: that one, if here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (TypeError, RuntimeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={shown(device)}: choose auto, cpu, cuda or cuda:N")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if chosen.type == "cuda" and (chosen.index or 0) >= visible:
        raise ConfigError(f"device={shown(device)}: this machine has {visible} CUDA GPU(s) "
                          "torch can use; device=auto takes one where there is one")
    return chosen


class TrainedModel(nn.Module):
    """A checkpoint's network and its run's config: all that inference needs of a run."""

    def __init__(self, cfg: DictConfig, net: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        return self.net(image)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """What a training checkpoint file holds (for training to continue from, or inference):
    whatever an unreadable or foreign file makes torch raise is one DataError, in one line."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"ckpt_path={path}: not a training checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise DataError(f"ckpt_path={path}: not a training checkpoint (no state_dict in it)")
    return checkpoint


def load_checkpoint(ckpt_path: str | Path, device: torch.device) -> TrainedModel:
    """The network of a training checkpoint, in eval mode on ``device``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise DataError(f"ckpt_path={path}: {not_found(path, 'checkpoint file')}")
    checkpoint = read_checkpoint(path)
    state = checkpoint["state_dict"]
    try:
        cfg = OmegaConf.create(checkpoint["hyper_parameters"]["cfg"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"ckpt_path={path}: not a prostate-seg checkpoint (no run config "
                        "stored in it)") from None
    try:
        check_extras_installed(cfg)  # a MONAI network's checkpoint where MONAI is missing
    except ConfigError as exc:
        raise ConfigError(f"ckpt_path={path}: {exc}") from None
    net = build(cfg.model.net)
    weights = network_weights(state)
    problem = weights_mismatch(net, weights)
    if problem:
        raise DataError(f"ckpt_path={path}: its weights do not match the network its own config "
                        f"describes (model.net={OmegaConf.to_container(cfg.model.net)}): {problem}")
    net.load_state_dict(weights)
    return TrainedModel(cfg, net).to(device).eval()


class SlicePredictor:
    """Probabilities for stacks of display-oriented uint8 slices ``(Z, rows, cols)``."""

    def __init__(self, module: TrainedModel, batch_size: int = 32, tta: bool = False):
        self.module = module
        cfg = module.cfg
        self.transform = build(cfg.data.val_transform)
        self.context = int(cfg.data.context_slices)
        # How the training data was prepared (older checkpoints: the defaults at image_size).
        self.prep = PrepareSettings.from_config({"image_size": cfg.data.image_size,
                                                 **(cfg.get("preprocessing") or {})})
        self.batch_size = batch_size
        self.tta = tta

    def _inputs(self, fitted: np.ndarray) -> torch.Tensor:
        """(Z, S, S) fitted uint8 slices -> (Z, C, H, W) network input via the val transform."""
        z = len(fitted)
        images = [np.stack(fitted[context_window(k, z, self.context)], axis=-1) for k in range(z)]
        items = [self.transform(image=image)["image"] for image in images]
        return torch.from_numpy(np.ascontiguousarray(np.stack(items).transpose(0, 3, 1, 2))).float()

    @torch.no_grad()
    def _probabilities(self, inputs: torch.Tensor) -> torch.Tensor:
        device = next(self.module.parameters()).device
        outputs = []
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start : start + self.batch_size].to(device)
            prob = torch.sigmoid(self.module(batch).float())
            if self.tta:
                mirrored = torch.sigmoid(self.module(batch.flip(-1)).float()).flip(-1)
                prob = (prob + mirrored) / 2
            outputs.append(prob[:, 0].cpu())
        return torch.cat(outputs)

    def predict_fitted(self, fitted: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """Slices already brought to the dataset size (the prepared PNGs) -> (Z, rows, cols)."""
        prob = self._probabilities(self._inputs(fitted)).numpy()
        return np.stack([unfit_slice(p, rows, cols, self.prep.fit) for p in prob])

    def predict_volume(self, slices: np.ndarray) -> np.ndarray:
        """Windowed uint8 display slices of one scan -> probabilities of the same shape."""
        _, rows, cols = slices.shape
        fitted = np.stack([fit_slice(s, self.prep.image_size, self.prep.fit) for s in slices])
        return self.predict_fitted(fitted, rows, cols)


def binarize(prob: np.ndarray, largest_component: bool) -> np.ndarray:
    """``prob > 0.5``; with ``largest_component`` only its largest 3D connected component."""
    mask = prob > 0.5
    if not largest_component:
        return mask
    labels, count = ndimage.label(mask)
    return labels == np.bincount(labels.ravel())[1:].argmax() + 1 if count > 1 else mask
