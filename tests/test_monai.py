"""MONAI networks as config entries (model=monai_unet, model=monai_segresnet): built with
instantiate, trained, and rebuilt from a checkpoint for prediction."""

from __future__ import annotations

import importlib.util

import nibabel as nib
import pytest
import torch
from helpers import TINY, compose_train
from hydra.utils import instantiate

from prostate_seg.training.checks import check_train_config
from prostate_seg.errors import ConfigError

monai = pytest.importorskip("monai", reason="MONAI is the optional extra [monai]")

# Small versions of both networks, on the 48 px phantom slices of the other tests.
NETWORKS = {
    "monai_unet": ["model=monai_unet", "model.net.channels=[8,16,32]", "model.net.strides=[2,2]",
                   "model.net.num_res_units=1"],
    "monai_segresnet": ["model=monai_segresnet", "model.net.init_filters=8",
                        "model.net.blocks_down=[1,1,1]", "model.net.blocks_up=[1,1]",
                        "model.input_multiple=4"],
}
CLASSES = {"monai_unet": monai.networks.nets.UNet,
           "monai_segresnet": monai.networks.nets.SegResNet}
SMALL = [o for o in TINY if not o.startswith("model")]


def hide_monai(monkeypatch) -> None:
    """As if the [monai] extra were not installed."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "monai" else find_spec(name, *a))


def _config(model: str, tmp_path, *extra: str):
    return compose_train([*SMALL, *NETWORKS[model], *extra], tmp_path)


@pytest.mark.parametrize("model", NETWORKS)
def test_network_builds_from_config_and_trains_a_step(model, tmp_path):
    cfg = _config(model, tmp_path, "data.dir=.", "data.context_slices=1")
    net = instantiate(cfg.model.net)
    assert isinstance(net, CLASSES[model])
    x = torch.randn(2, 3, 48, 48)  # 2.5D: one neighbour on each side
    y = (torch.rand(2, 1, 48, 48) > 0.7).float()
    out = net(x)
    assert out.shape == y.shape
    torch.nn.functional.binary_cross_entropy_with_logits(out, y).backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


@pytest.mark.parametrize("model", NETWORKS)
def test_fit_then_predict_rebuilds_the_network_from_the_checkpoint(model, prepared, phantoms,
                                                                    tmp_path, monkeypatch):
    from prostate_seg.inference.evaluate import evaluate_checkpoint
    from prostate_seg.inference.predictor import load_checkpoint, pick_device
    from prostate_seg.inference.predict import predict_paths
    from prostate_seg.training.fit import train

    run = tmp_path / "run"
    results = train(_config(model, run, f"data.dir={prepared}", "trainer.max_epochs=1"))
    assert results["net"] == f"monai.networks.nets.{CLASSES[model].__name__}"
    assert results["features"] == "-"
    (ckpt,) = (run / "checkpoints").glob("best-*.ckpt")
    assert isinstance(load_checkpoint(ckpt, pick_device("cpu")).net, CLASSES[model])
    # the run's score of its held-out patients is the checkpoint's, scored again from the file
    rows = evaluate_checkpoint(ckpt, subset="val")
    assert results["val/dice_original"] == pytest.approx(
        sum(r["dice"] for r in rows) / len(rows), abs=1e-6)
    with monkeypatch.context() as without_monai:
        hide_monai(without_monai)
        with pytest.raises(ConfigError) as error:
            load_checkpoint(ckpt, pick_device("cpu"))
    assert str(error.value) == (f"ckpt_path={ckpt}: model.net: monai.networks.nets."
                                f"{CLASSES[model].__name__} needs monai, which is not installed "
                                '(pip install "prostate-seg[monai]")')

    scan = sorted((phantoms / "images").glob("*.nii.gz"))[0]
    predict_paths(ckpt, scan, tmp_path / "mask.nii.gz")
    mask = nib.load(tmp_path / "mask.nii.gz")
    assert mask.shape == nib.load(scan).shape
    assert set(mask.get_fdata().ravel().tolist()) <= {0.0, 1.0}


def test_an_image_size_the_network_cannot_halve_is_one_line(tmp_path):
    cfg = _config("monai_unet", tmp_path, "data.dir=.", "data.image_size=50")
    with pytest.raises(ConfigError, match=r"^data.image_size=50: must be a multiple of "
                       r"model.input_multiple = 4 \(monai.networks.nets.UNet does not pad"):
        check_train_config(cfg)
    # The multiple follows the strides: 2 x 2 x 2 x 2 for the full network.
    full = compose_train(["model=monai_unet", "data.dir=."], tmp_path)
    assert full.model.input_multiple == 16


def test_missing_monai_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    hide_monai(monkeypatch)
    cfg = _config("monai_segresnet", tmp_path, "data.dir=.")
    with pytest.raises(ConfigError) as error:
        check_train_config(cfg)
    assert str(error.value) == ("model.net: monai.networks.nets.SegResNet needs monai, which is "
                                'not installed (pip install "prostate-seg[monai]")')
