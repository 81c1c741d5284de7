"""The DataModule: patient-level split shared by all runs, batches, 2.5D input, augmentation."""

import csv
import json
import re

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY, compose_train
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from prostate_seg.data.datamodule import SliceDataModule
from prostate_seg.data.dataset import SliceDataset, SliceRecord, init_worker, read_png
from prostate_seg.errors import ConfigError, DataError


def datamodule(data_dir, tmp_path, *overrides) -> SliceDataModule:
    cfg = compose_train([*TINY, f"data.dir={data_dir}", *overrides], tmp_path / "run")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return dm


def test_a_network_size_above_the_prepared_size_is_a_loud_warning(prepared, tmp_path, caplog):
    datamodule(prepared, tmp_path, "data.image_size=32")  # smaller than prepared: a choice
    datamodule(prepared, tmp_path, "data.image_size=48")
    assert not caplog.records
    datamodule(prepared, tmp_path, "data.image_size=64")
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage().startswith(
        f"data.image_size=64 but {prepared} holds 48 px slices: each is enlarged")


def test_the_network_size_defaults_to_the_size_prepare_made(prepared, tmp_path):
    untold = [o for o in TINY if not o.startswith("data.image_size=")]
    cfg = compose_train([*untold, f"data.dir={prepared}"], tmp_path / "run")
    assert cfg.data.image_size == 48  # tests/conftest.py prepares at 48
    assert compose_train([*untold, "data.dir=nowhere"], tmp_path / "r2").data.image_size == 384
    assert compose_train([*TINY, f"data.dir={prepared}", "data.image_size=32"],
                         tmp_path / "r3").data.image_size == 32


def test_fold_splits_by_patient_and_is_shared_by_every_run(prepared_copy, tmp_path):
    first = datamodule(prepared_copy, tmp_path, "data.folds=4", "data.fold=1")
    roles = {name: {r.patient for r in getattr(first, f"{name}_set").records}
             for name in ("train", "select", "val")}
    assert all(roles[a].isdisjoint(roles[b]) for a, b in (("train", "select"), ("train", "val"),
                                                          ("select", "val")))
    assert len(roles["train"] | roles["select"] | roles["val"]) == 8
    assert len(roles["val"]) == 2 and len(roles["select"]) == 1  # 8 / 4 folds; 15 % of 6
    # Lightning validates (chooses epoch and checkpoint) on the selection patients only
    assert first.val_dataloader().dataset is first.select_set
    stored = json.loads((prepared_copy / "split.json").read_text())
    assert {k: set(v) for k, v in stored["splits"][1].items()} == roles
    assert stored["split_seed"] == 0
    second = datamodule(prepared_copy, tmp_path, "data.folds=4", "data.fold=1")
    assert [r.image for r in second.val_set.records] == [r.image for r in first.val_set.records]
    # The same seed on a fresh copy gives the same split; another seed another one.
    (prepared_copy / "split.json").unlink()
    again = datamodule(prepared_copy, tmp_path, "data.folds=4", "data.fold=1")
    assert {r.patient for r in again.val_set.records} == roles["val"]
    (prepared_copy / "split.json").unlink()
    other = datamodule(prepared_copy, tmp_path, "data.folds=4", "data.fold=1", "data.split_seed=5")
    assert {r.patient for r in other.val_set.records} != roles["val"]


def test_test_patients_sit_outside_every_fold(prepared_copy, tmp_path):
    held_out = ["phantom002", "phantom005"]
    for fold in range(3):
        dm = datamodule(prepared_copy, tmp_path, "data.folds=3", f"data.fold={fold}",
                        f"data.test_patients=[{','.join(held_out)}]")
        assert list(dm.split.test) == held_out
        seen = dm.train_set.records + dm.select_set.records + dm.val_set.records
        assert {r.patient for r in seen}.isdisjoint(held_out)


@pytest.mark.parametrize("override", ["data.split_seed=3", "data.folds=3", "data.test_fraction=0.25",
                                      "data.select_fraction=0.3"])
def test_other_split_settings_never_silently_replace_the_stored_split(prepared_copy, tmp_path,
                                                                     override):
    datamodule(prepared_copy, tmp_path)
    before = (prepared_copy / "split.json").read_text()
    with pytest.raises(ConfigError, match=override.replace(".", r"\.")):
        datamodule(prepared_copy, tmp_path, override)
    assert (prepared_copy / "split.json").read_text() == before


def test_batches_hold_images_in_unit_range_and_binary_masks(prepared_copy, tmp_path):
    dm = datamodule(prepared_copy, tmp_path)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (8, 1, 48, 48) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert batch["volume"].max() < len(dm.select_set.patients)
    first = dm.select_set.records[0]
    assert torch.allclose(batch["image"][0, 0], torch.from_numpy(read_png(first.image) / 255.0).float())


def test_context_slices_stack_neighbours_as_channels(prepared_copy, tmp_path):
    dm = datamodule(prepared_copy, tmp_path, "data.context_slices=1")
    dataset = dm.val_set
    item = dataset[1]  # the second slice of the first validation patient
    assert item["image"].shape == (3, 48, 48)
    for channel, neighbour in enumerate((0, 1, 2)):
        expected = read_png(dataset.records[neighbour].image) / 255.0
        assert torch.allclose(item["image"][channel], torch.from_numpy(expected).float())
    edge = dataset[0]  # the first slice repeats itself as its missing lower neighbour
    assert torch.equal(edge["image"][0], edge["image"][1])
    assert dm.val_set.records[0].patient == dm.val_set.records[2].patient


def test_cache_gives_the_same_items(prepared_copy, tmp_path):
    plain = datamodule(prepared_copy, tmp_path).val_set
    cached_dm = datamodule(prepared_copy, tmp_path, "data.cache=true")
    cached = cached_dm.val_set
    for i in (0, 5, len(plain) - 1):
        assert torch.equal(plain[i]["image"], cached[i]["image"])
        assert torch.equal(plain[i]["mask"], cached[i]["mask"])
    assert cached_dm.train_set._images is not None  # decoded once, in memory


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("context", [0, 1])
def test_augmented_mask_follows_its_image(cache, context, tmp_path):
    """Phantom slices whose bright region is exactly their mask: after the training augmentation
    (rotation, flips, zoom, intensity) the mask still covers the bright pixels, in every channel of
    a 2.5D input, and the draws differ (the augmentation does move things)."""
    records = []
    for k in range(3):
        image = np.full((48, 48), 40, np.uint8)
        mask = np.zeros((48, 48), np.uint8)
        mask[8 + k:22 + k, 26:40] = 255  # off-centre, so rotations and flips move it
        mask[30:36, 10:14] = 255  # and not symmetric
        image[mask > 0] = 230
        paths = []
        for kind, pixels in (("image", image), ("mask", mask)):
            path = tmp_path / f"{kind}_{k}.png"
            cv2.imwrite(str(path), pixels)
            paths.append(path)
        records.append(SliceRecord("p", k, *paths, 48, 48))
    cfg = compose_train([*TINY, "data.dir=."], tmp_path / "run")
    dataset = SliceDataset(records, instantiate(cfg.data.train_transform), context, cache)
    dataset.reseed(7)
    masks = []
    for _ in range(12):
        item = dataset[1]
        mask = item["mask"][0] > 0.5
        for channel in item["image"]:  # brightness, contrast and gamma move the levels
            bright = channel > (channel.min() + channel.max()) / 2
            overlap = (bright & mask).sum() / (bright | mask).sum()
            assert overlap > 0.8, f"mask and bright region part ways (IoU {overlap:.2f})"
        masks.append(mask)
    assert len({m.numpy().tobytes() for m in masks}) > 6


@pytest.mark.parametrize("nested", [False, True])
def test_the_transforms_of_a_pipeline_draw_independently(nested, tmp_path):
    """Two flips at p = 0.5 give all four combinations about equally often, also inside a
    nested pipeline. albumentations seeds every child of a Compose with the Compose's own seed,
    so the two drew the same numbers: both or neither, never one alone (and in the study's
    pipeline, no vertical flip without a horizontal one)."""
    import albumentations as A

    image = np.zeros((8, 8), np.uint8)
    image[0, 1] = 255  # one pixel off both axes: where it lands says which flips ran
    paths = [tmp_path / "image.png", tmp_path / "mask.png"]
    for path in paths:
        cv2.imwrite(str(path), image)
    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    transform = A.Compose([A.Sequential(flips, p=1)] if nested else flips)
    dataset = SliceDataset([SliceRecord("p", 0, *paths, 8, 8)], transform)
    dataset.reseed(3)
    where = [tuple(np.argwhere(dataset[0]["mask"][0].numpy() > 0.5)[0]) for _ in range(800)]
    counts = {spot: where.count(spot) for spot in [(0, 1), (0, 6), (7, 1), (7, 6)]}
    assert sum(counts.values()) == 800
    assert all(150 < n < 250 for n in counts.values()), counts


def test_each_loader_worker_draws_its_own_augmentations(prepared_copy, tmp_path):
    dm = datamodule(prepared_copy, tmp_path)
    loader = DataLoader(dm.train_set, sampler=[3] * 4, batch_size=1, num_workers=2,
                        worker_init_fn=init_worker)
    images = [b["image"][0, 0].numpy() for b in loader]
    # Workers 0 and 1 take turns: without per-worker seeds, items 0 and 1 would be identical.
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_loader_workers_run_opencv_single_threaded(prepared_copy, tmp_path, monkeypatch):
    dm = datamodule(prepared_copy, tmp_path, "data.num_workers=2", "data.persistent_workers=false")
    monkeypatch.setattr(SliceDataset, "__getitem__", lambda self, i: cv2.getNumThreads())
    threads = torch.cat(list(dm.train_dataloader())).tolist()
    assert threads and set(threads) == {1}


def _rewrite_manifest(data_dir, change):
    with open(data_dir / "manifest.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rows = change(rows)
    with open(data_dir / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _renumber(patient, mapping):
    def change(rows):
        for row in rows:
            if row["patient"] == patient and int(row["slice"]) in mapping:
                row["slice"] = str(mapping[int(row["slice"])])
        return rows
    return change


@pytest.mark.parametrize("change, message", [
    (_renumber("phantom002", {3: 2}), "slice 2 listed more than once; slice 3 missing"),
    (lambda rows: [r for r in rows if (r["patient"], r["slice"]) != ("phantom002", "4")],
     "slice 4 missing"),
    (lambda rows: rows + [r for r in rows if (r["patient"], r["slice"]) == ("phantom002", "0")],
     "slice 0 listed more than once"),
    (_renumber("phantom002", {0: -1}), "slice 0 missing; negative slice -1"),
])
def test_manifest_slice_indices_must_run_from_zero_without_gaps(change, message, prepared_copy):
    _rewrite_manifest(prepared_copy, change)
    with pytest.raises(DataError) as info:
        SliceDataModule(str(prepared_copy), image_size=48).setup("fit")
    assert f"manifest.csv: patient phantom002: slice indices must be 0 ... n-1 ({message})" \
        in str(info.value)


@pytest.mark.parametrize("scale, values", [(1, "[0, 1]"), (128, "[0, 128]")])
def test_mask_pngs_other_than_0_and_255_are_refused_at_setup(scale, values, prepared_copy):
    victim = prepared_copy / "masks" / "phantom005_006.png"
    mask = read_png(victim)
    assert mask.max() == 255  # a slice with gland
    cv2.imwrite(str(victim), (mask > 0).astype(np.uint8) * scale)
    with pytest.raises(DataError, match=rf"phantom005_006.png: mask values {re.escape(values)}"):
        SliceDataModule(str(prepared_copy), image_size=48).setup("fit")


def test_a_dataset_without_any_gland_is_refused_at_setup(prepared_copy):
    for mask in (prepared_copy / "masks").iterdir():
        cv2.imwrite(str(mask), np.zeros((48, 48), np.uint8))
    with pytest.raises(DataError, match="no mask of the dataset holds a gland pixel"):
        SliceDataModule(str(prepared_copy), image_size=48).setup("fit")
