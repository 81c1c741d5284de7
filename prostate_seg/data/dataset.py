"""The PNG slice dataset: manifest reading, up-front file checks, and the torch Dataset."""

from __future__ import annotations

import csv
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from lightning_fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import Dataset

from prostate_seg.errors import DataError
from prostate_seg.files import MANIFEST_FILE, not_found

REQUIRED_COLUMNS = ("patient", "slice", "image", "mask", "height", "width")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


@dataclass(frozen=True)
class SliceRecord:
    patient: str
    slice: int
    image: Path
    mask: Path
    height: int  # original in-plane size of the scan
    width: int


def read_manifest(data_dir: Path) -> list[SliceRecord]:
    """All slices of a prepared dataset, sorted by patient and slice index."""
    if not data_dir.is_dir():
        raise DataError(f"data.dir={data_dir}: {not_found(data_dir, 'folder')}")
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"{path}: manifest not found (is {data_dir} made by "
                        "python -m prostate_seg prepare?)")
    # utf-8-sig: a manifest saved by a spreadsheet starts with a byte-order mark
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing columns {missing}")
            records = [_record(row, data_dir, path, reader.line_num) for row in reader]
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not records:
        raise DataError(f"{path}: no slices listed; the dataset is empty")
    records.sort(key=lambda r: (r.patient, r.slice))
    _check_slice_indices(records, path)
    return records


def _record(row: dict[str, str | None], data_dir: Path, path: Path, line: int) -> SliceRecord:
    try:
        if not row["image"] or not row["mask"]:
            raise ValueError("empty image or mask path")
        return SliceRecord(row["patient"], int(row["slice"]), data_dir / row["image"],
                           data_dir / row["mask"], int(row["height"]), int(row["width"]))
    except (TypeError, ValueError) as exc:  # a short row's missing fields are None
        raise DataError(f"{path}: line {line}: malformed row ({exc})") from None


def _check_slice_indices(records: list[SliceRecord], path: Path) -> None:
    """0 ... n-1 once each: 2.5D neighbours and rebuilt volumes are found by position."""
    by_patient: dict[str, list[int]] = {}
    for record in records:
        by_patient.setdefault(record.patient, []).append(record.slice)
    for patient, indices in by_patient.items():
        if indices == list(range(len(indices))):
            continue
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        missing = sorted(set(range(max(indices) + 1)) - set(indices))
        problem = "; ".join(part for part in (
            f"slice {', '.join(map(str, repeated))} listed more than once" if repeated else "",
            f"slice {', '.join(map(str, missing[:10]))} missing" if missing else "",
            f"negative slice {min(indices)}" if min(indices) < 0 else "") if part)
        raise DataError(f"{path}: patient {patient}: slice indices must be 0 ... n-1 ({problem})")


def png_size(path: Path) -> tuple[int, int]:
    """(height, width) from a PNG's header; checks that the file is a complete PNG of 8-bit
    samples (a 16-bit one would be read as its top 8 bits: a scan's grey levels crushed)."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
            f.seek(0, 2)
            if f.tell() < 33:
                raise DataError(f"{path}: not a PNG file (only {f.tell()} bytes)")
            f.seek(-8, 2)
            tail = f.read(8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise DataError(f"{path}: not a PNG file")
    if head[24] == 16:
        raise DataError(f"{path}: 16 bits per sample; slices must be 8-bit (as prepare writes "
                        "them), or training would see only the top 8 bits")
    if tail != _PNG_END:
        raise DataError(f"{path}: truncated PNG (no IEND chunk at the end)")
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def check_files(records: list[SliceRecord], expected_size: int | None) -> None:
    """Complete PNGs of one size, masks of only 0 and 255 (a 0/1 or label-valued mask would read
    as empty or wrong) and some gland: fail here, not in a loader worker."""
    sizes, gland = set(), 0
    for record in records:
        if not record.mask.exists():
            raise DataError(f"{record.mask}: mask missing for image {record.image.name}")
        image_size, mask_size = png_size(record.image), png_size(record.mask)
        if image_size != mask_size:
            raise DataError(f"{record.mask}: mask is {mask_size[0]}x{mask_size[1]} but its image "
                            f"is {image_size[0]}x{image_size[1]}")
        if expected_size is not None and image_size != (expected_size, expected_size):
            raise DataError(f"{record.image}: {image_size[0]}x{image_size[1]} pixels, but the "
                            f"dataset was prepared at {expected_size}x{expected_size}")
        sizes.add(image_size)
        mask = read_png(record.mask)
        full = np.count_nonzero(mask == 255)
        if np.count_nonzero(mask) != full:
            values = np.unique(mask)
            raise DataError(f"{record.mask}: mask values {values[:8].tolist()} "
                            f"{'...' if len(values) > 8 else ''}; a mask PNG must hold only 0 and "
                            "255 (prepare writes them so)")
        gland += full
    if len(sizes) > 1:
        raise DataError(f"slices of different sizes {sorted(sizes)} in one dataset")
    if gland == 0:
        raise DataError(f"{records[0].mask.parent}: no mask of the dataset holds a gland pixel; "
                        "a network trained on it would only learn to predict nothing")


def read_png(path: Path) -> np.ndarray:
    try:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    except cv2.error as exc:
        raise DataError(f"{path}: unreadable PNG ({str(exc).strip().splitlines()[-1]})") from None
    if image is None:
        raise DataError(f"{path}: unreadable PNG")
    return image


def context_window(pos: int, count: int, context: int) -> list[int]:
    """2.5D input: slice ``pos`` and ``context`` neighbours each side, repeated at the ends."""
    return [min(max(pos + d, 0), count - 1) for d in range(-context, context + 1)]


class SliceDataset(Dataset):
    """Items: ``image`` (2k + 1, H, W) for k context slices, ``mask`` (1, H, W) in {0, 1},
    ``volume`` (index of the patient in ``patients``) and ``slice``."""

    def __init__(self, records: list[SliceRecord], transform: A.BasicTransform | None,
                 context_slices: int = 0, cache: bool = False):
        self.records = records
        self.transform = transform
        self.patients = sorted({r.patient for r in records})
        volume_of = {p: i for i, p in enumerate(self.patients)}
        self.volume_index = [volume_of[r.patient] for r in records]
        by_patient: dict[str, list[int]] = {}  # positions in the sorted records
        for i, r in enumerate(records):
            by_patient.setdefault(r.patient, []).append(i)
        self.neighbours = [[at[j] for j in context_window(pos, len(at), context_slices)]
                           for at in by_patient.values() for pos in range(len(at))]
        self._images = [read_png(r.image) for r in records] if cache else None
        self._masks = [read_png(r.mask) for r in records] if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def reseed(self, seed: int) -> None:
        """Give the augmentation its own random stream (called in each loader worker)."""
        if self.transform is not None:
            seed_transform(self.transform, seed)

    def _image(self, i: int) -> np.ndarray:
        return self._images[i] if self._images is not None else read_png(self.records[i].image)

    def _mask(self, i: int) -> np.ndarray:
        return self._masks[i] if self._masks is not None else read_png(self.records[i].mask)

    def gland_pixels(self, index: int) -> int:
        """Gland area of a slice, from its mask alone (no image decoding, no transform)."""
        return int(np.count_nonzero(self._mask(index) > 127))

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = np.stack([self._image(i) for i in self.neighbours[index]], axis=-1)
        mask = (self._mask(index) > 127).astype(np.uint8)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        else:
            image = image.astype(np.float32) / 255.0
        if image.ndim == 2:
            image = image[..., None]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), np.float32)),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, np.float32))[None],
            "volume": self.volume_index[index],
            "slice": self.records[index].slice,
        }


def seed_transform(transform: A.BasicTransform | A.BaseCompose, seed: int) -> None:
    """Seed a pipeline with one stream per transform. albumentations' ``set_random_seed`` hands a
    Compose's seed to every child unchanged, so children that draw alike draw the same numbers:
    a vertical flip only ever came with a horizontal one, blur with noise."""
    transform.set_random_seed(seed)
    children = [t for t in getattr(transform, "transforms", [])
                if isinstance(t, (A.BasicTransform, A.BaseCompose))]
    for child, own in zip(children, np.random.SeedSequence(seed).generate_state(len(children))):
        seed_transform(child, int(own))


def init_worker(worker_id: int) -> None:
    """A distinct augmentation stream per worker, epoch and DDP rank (Lightning's seeding), and
    OpenCV single-threaded: the workers are the parallelism, a pool per worker oversubscribes."""
    cv2.setNumThreads(0)
    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(torch.initial_seed() % 2**32)
