"""Scans -> the PNG slice dataset every other stage reads (layout and options: docs/USAGE.md).

The dataset is built beside its place and renamed into it, so it is whole or absent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from omegaconf import DictConfig

from prostate_seg.data.resize import FIT_MODES, fit_slice
from prostate_seg.data.split import SPLIT_FILE
from prostate_seg.data.volume import (INTENSITY_MODES, VolumeGeometry, display_affine,
                                      geometry_of, is_nifti, load_nifti, strip_nifti_suffix,
                                      to_grey_levels, to_slices, voxel_array)
from prostate_seg.errors import ConfigError, DataError
from prostate_seg.settings import check_values, shown
from prostate_seg.files import (MANIFEST_FILE, PREPARE_FILE, beside, check_name_fits,
                                check_writable_folder, new_folders, not_found, parent_stops,
                                refuse_existing, sigterm_as_interrupt, write_csv, write_json)

log = logging.getLogger(__name__)

LAYOUTS = (("images", "masks"), ("imagesTr", "labelsTr"))
MANIFEST_FIELDS = [
    "patient", "slice", "image", "mask", "height", "width", "num_slices",
    "spacing_slice", "spacing_row", "spacing_col", "spacing_known", "gland_pixels",
    "source_image", "source_mask",
]
PNG_FLAGS = [cv2.IMWRITE_PNG_COMPRESSION, 1]
AFFINE_TOLERANCE_MM = 1e-2
# A scan put where its mask belongs (imagesTr copied as labelsTr) passes as non-negative
# integers: its grey levels are hundreds of distinct values and, with mask_labels=null, nearly
# every voxel is gland. A label map holds a few labels (zonal ones: 2 to 5), and the prostate
# is a few percent of a pelvic scan (about half of a crop to its box), so more of either is
# refused as a scan.
MAX_MASK_LABELS = 16
MAX_GLAND_FRACTION = 0.9
# Files that mark a folder as a dataset made by prepare: only such a folder is replaced.
DATASET_MARKERS = (PREPARE_FILE, MANIFEST_FILE)
# prepare.json: the digest of every file of CONTENT_FOLDERS, which a run's identity takes
CONTENT_DIGEST = "content_digest"
# What prepare writes its slices and volumes into: anything there that the manifest does not
# list (a run folder, predicted masks) is the user's, and overwrite=true, which deletes these
# folders whole, refuses it.
CONTENT_FOLDERS = ("images", "masks", "volumes")
REPORT_FILE = "prepare_report.json"
# A dataset's own entries (split.json: made by training, tied to this data); overwrite=true
# deletes the old dataset whole, so anything else in it is the user's and stops it.
OWN_ENTRIES = (*DATASET_MARKERS, REPORT_FILE, SPLIT_FILE, *CONTENT_FOLDERS)
LITTER = (".DS_Store", "Thumbs.db", "desktop.ini")  # a file browser's, deleted with the dataset


@dataclass(frozen=True)
class PrepareSettings:
    """What turns a scan into network input; stored in prepare.json and reused by predict."""

    image_size: int = 384
    fit: str = "resize"
    window: tuple[float, float] = (0.5, 99.5)
    image_channel: int = 0
    mask_labels: tuple[int, ...] | None = None
    intensity: str = "window"  # or landmarks (docs/RESULTS.md: why not the default)

    def __post_init__(self) -> None:
        check_values("prepare", image_size=self.image_size, window=list(self.window),
                     image_channel=self.image_channel,
                     mask_labels=None if self.mask_labels is None else list(self.mask_labels))
        if self.fit not in FIT_MODES:
            raise ConfigError(f"fit={shown(self.fit)}: choose one of {', '.join(FIT_MODES)}")
        low, high = self.window
        if not 0.0 <= low < high <= 100.0:
            raise ConfigError(f"window=[{low}, {high}]: need 0 <= low < high <= 100 (percentiles)")
        if self.intensity not in INTENSITY_MODES:
            raise ConfigError(f"intensity={shown(self.intensity)}: choose one of "
                              f"{', '.join(INTENSITY_MODES)}")

    @classmethod
    def from_config(cls, cfg: DictConfig | dict) -> PrepareSettings:
        labels = cfg.get("mask_labels")
        return cls(int(cfg.get("image_size", 384)), str(cfg.get("fit", "resize")),
                   tuple(float(w) for w in cfg.get("window", (0.5, 99.5))),
                   int(cfg.get("image_channel", 0)),
                   None if labels is None else tuple(int(x) for x in labels),
                   str(cfg.get("intensity", "window")))  # datasets made before: window


@dataclass(frozen=True)
class Case:
    patient: str
    image: Path  # a NIfTI file or a DICOM folder
    mask: Path | None


def check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={shown(on_error)}: choose raise or skip")


def patient_id(path: Path) -> str:
    """The patient a scan file belongs to: its name without .nii(.gz) and nnU-Net's _0000."""
    name = strip_nifti_suffix(path.name)
    return name[:-5] if name.endswith("_0000") else name


def nnunet_cases(paths: Iterable[Path]) -> set[str]:
    """The cases whose first channel is named as nnU-Net names it (``case_0000``)."""
    return {patient_id(p) for p in paths if strip_nifti_suffix(p.name).endswith("_0000")}


def other_channel(path: Path, cases: Collection[str]) -> str | None:
    """Why the scan ``path`` is no patient of its own: nnU-Net's ``case_0001`` (``_0002``, ...)
    is another channel of ``case``, whose ``case_0000`` is among ``cases`` (nnunet_cases);
    None otherwise (``subj_2019`` beside ``subj`` is a patient)."""
    match = re.fullmatch(r"(.+)_(\d{4})", patient_id(path))
    if not (match and match[1] in cases):
        return None
    return (f"{path}: channel {match[2]} of nnU-Net case {match[1]}; this tool takes one channel "
            f"per scan, the _0000 file: keep only those, or give 4D images and image_channel")


def _by_patient(paths: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(patient_id(path), []).append(path)
    return groups


def scans_in(folder: Path, is_scan: Callable[[Path], bool], other: str) -> list[Path]:
    """The scans of ``folder`` in name order; the other visible files are named in a warning
    (``other`` says what they are not): a scan in another format is never missed silently."""
    visible = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    ignored = [p.name + "/" * p.is_dir() for p in visible if not is_scan(p)]
    if ignored:
        log.warning("%s: ignored %d entries that are %s: %s", folder, len(ignored), other,
                    ", ".join(ignored[:10]))
    return [p for p in visible if is_scan(p)]


def find_cases(input_dir: Path) -> tuple[list[Case], list[str]]:
    """Images paired with masks, and one problem line per unpaired file or doubly claimed id."""
    if not input_dir.is_dir():
        raise DataError(f"input_dir={input_dir}: {not_found(input_dir, 'folder')}")
    for image_folder, mask_folder in LAYOUTS:
        images_dir, masks_dir = input_dir / image_folder, input_dir / mask_folder
        if images_dir.is_dir():
            break
    else:
        raise DataError(f"input_dir={input_dir}: expected images/ + masks/ or imagesTr/ + "
                        "labelsTr/ inside, found neither")
    if not masks_dir.is_dir():
        raise DataError(f"{masks_dir}: mask folder not found (next to {images_dir})")
    images = _by_patient(scans_in(images_dir, lambda p: is_nifti(p) or p.is_dir(),
                                  "neither NIfTI nor a DICOM folder"))
    masks = _by_patient(scans_in(masks_dir, is_nifti, "not NIfTI"))
    if not images:
        raise DataError(f"{images_dir}: no NIfTI files or DICOM folders in it")
    # Which of two files of one patient (x.nii and x.nii.gz, y and y_0000, a DICOM folder z/
    # and z.nii.gz) is meant cannot be guessed: neither is used.
    twice = sorted((p, found) for p, found in [*images.items(), *masks.items()] if len(found) > 1)
    problems = [f"{found[0]}: {' and '.join(p.name for p in found)} in {found[0].parent} are "
                f"both patient {patient!r}; keep one of them" for patient, found in twice]
    claimed_twice = {patient for patient, _ in twice}
    problems += [f"{masks[p][0]}: mask without image (no {p} in {images_dir})"
                 for p in sorted(set(masks) - set(images) - claimed_twice)]
    first_channels = nnunet_cases(path for found in images.values() for path in found)
    channels = {p: why for p in sorted(set(images) - set(masks) - claimed_twice)
                if (why := other_channel(images[p][0], first_channels))}
    problems += channels.values()
    cases = [Case(p, images[p][0], masks.get(p, [None])[0]) for p in sorted(images)
             if p not in claimed_twice and p not in channels]
    return cases, problems


def _gland_mask(labels: np.ndarray, path: Path, mask_labels: tuple[int, ...] | None) -> np.ndarray:
    if not np.isfinite(labels).all():
        raise DataError(f"{path}: mask has NaN or infinite values")
    if (labels < 0).any() or (labels != np.round(labels)).any():
        raise DataError(f"{path}: mask values must be non-negative integers")
    values = np.unique(labels)
    if mask_labels is None:
        if len(values) > MAX_MASK_LABELS:
            raise DataError(f"{path}: mask has {len(values)} distinct values; it looks like a "
                            f"scan, not a label map (more than {MAX_MASK_LABELS} are refused; "
                            "a label map of many labels: name the gland's in mask_labels)")
        gland = (labels > 0).astype(np.uint8)
    else:
        unexpected = sorted({int(v) for v in values if v != 0} - set(mask_labels))
        if unexpected:
            raise DataError(f"{path}: unexpected mask labels {unexpected} "
                            f"(mask_labels={list(mask_labels)}; add them there to count as gland)")
        gland = np.isin(labels, mask_labels).astype(np.uint8)
    if gland.mean() > MAX_GLAND_FRACTION:
        raise DataError(f"{path}: the gland covers {gland.mean():.0%} of the volume; it looks "
                        f"like a scan, not a label map (the prostate is a few percent of a scan; "
                        f"more than {MAX_GLAND_FRACTION:.0%} is refused)")
    return gland


def scan_slices(img: Any, path: Path,
                settings: PrepareSettings) -> tuple[np.ndarray, VolumeGeometry]:
    """A scan as the windowed uint8 display slices that the network's input is made of."""
    data = voxel_array(img, path, settings.image_channel)
    geometry = geometry_of(img, data.shape, path)
    return to_grey_levels(to_slices(data, geometry), path, *settings.window,
                          settings.intensity), geometry


def load_case(case: Case,
              settings: PrepareSettings) -> tuple[np.ndarray, np.ndarray, VolumeGeometry]:
    """Both volumes as display slices ``(Z, rows, cols)``: uint8 image, {0,1} mask."""
    if case.mask is None:
        raise DataError(f"{case.image}: image without mask (no {case.patient}.nii.gz in the "
                        "mask folder)")
    if case.image.is_dir():
        from prostate_seg.data.dicom import load_dicom_series  # pydicom is optional

        image_nii = load_dicom_series(case.image)
    else:
        image_nii = load_nifti(case.image)
    if settings.image_channel and len(image_nii.shape) == 3:
        # channel 0 would be prepared and another recorded (predict reads 3D scans whole, as
        # checkpoints of datasets prepared so before were trained)
        raise DataError(f"{case.image}: image_channel={settings.image_channel}, but this scan is "
                        "3D (one channel, 0); image_channel picks a volume of 4D images")
    image, geometry = scan_slices(image_nii, case.image, settings)
    mask_nii = load_nifti(case.mask)
    labels = voxel_array(mask_nii, case.mask)
    mask_geometry = geometry_of(mask_nii, labels.shape, case.mask)
    if not (geometry.spacing_known and mask_geometry.spacing_known):
        # A header without orientation: the mask is read in the image's own stored grid.
        if labels.shape != geometry.source_shape:
            raise DataError(f"{case.mask}: mask shape {labels.shape} != image shape "
                            f"{geometry.source_shape} ({case.image})")
        mask_geometry = geometry
    slices_mask = to_slices(labels, mask_geometry)
    if image.shape != slices_mask.shape:
        raise DataError(f"{case.mask}: mask grid {slices_mask.shape} does not match image grid "
                        f"{image.shape} ({case.image}) after reorientation")
    if geometry.spacing_known:
        a, b = display_affine(image_nii, geometry), display_affine(mask_nii, mask_geometry)
        if not np.allclose(a, b, atol=AFFINE_TOLERANCE_MM):
            raise DataError(f"{case.mask}: mask affine does not match the image affine of "
                            f"{case.image} (max difference {np.abs(a - b).max():.3g} mm)")
    return image, _gland_mask(slices_mask, case.mask, settings.mask_labels), geometry


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Written by Python: ``cv2.imwrite`` reports a failed write only by returning False."""
    ok, encoded = cv2.imencode(".png", pixels, PNG_FLAGS)
    if not ok:
        raise DataError(f"{path}: OpenCV could not encode this slice as PNG")
    path.write_bytes(encoded.tobytes())


def _prepare_case(case: Case, settings: PrepareSettings, out: Path) -> list[dict] | str:
    """The case's manifest rows, or why it cannot be used."""
    try:
        image, gland, geometry = load_case(case, settings)
    except DataError as exc:
        return str(exc)
    num_slices, rows, cols = image.shape
    np.savez_compressed(out / "volumes" / f"{case.patient}.npz", mask=gland,
                        spacing=np.asarray(geometry.spacing), spacing_known=geometry.spacing_known)
    result = []
    for k in range(num_slices):
        name = f"{case.patient}_{k:03d}.png"
        write_png(out / "images" / name, fit_slice(image[k], settings.image_size, settings.fit))
        write_png(out / "masks" / name,
                  fit_slice(gland[k] * 255, settings.image_size, settings.fit, nearest=True))
        result.append({
            "patient": case.patient, "slice": k, "image": f"images/{name}",
            "mask": f"masks/{name}", "height": rows, "width": cols, "num_slices": num_slices,
            "spacing_slice": geometry.spacing[0], "spacing_row": geometry.spacing[1],
            "spacing_col": geometry.spacing[2], "spacing_known": int(geometry.spacing_known),
            "gland_pixels": int(gland[k].sum()), "source_image": str(case.image),
            "source_mask": str(case.mask),
        })
    return result


def content_digest(data_dir: Path) -> str:
    """SHA-256 over the name and bytes of every slice, mask and volume file, in name order:
    data prepared from changed scans or with other settings differ here, whatever their sizes."""
    digest = hashlib.sha256()
    for folder in CONTENT_FOLDERS:
        if not (data_dir / folder).is_dir():  # a folder made by hand may lack volumes/
            continue
        for path in sorted((data_dir / folder).iterdir()):
            if not path.is_file():  # a user's folder put there is no slice (nor data)
                continue
            digest.update(f"{folder}/{path.name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(data_dir: Path) -> str:
    """The dataset by content (settings, slices, file digest), not by place: a moved copy is the
    same data. A missing digest is computed, never written back: a run never changes its data."""
    path = data_dir / PREPARE_FILE
    settings = json.loads(path.read_text()) if path.is_file() else {}
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in settings.items() if k != CONTENT_DIGEST},
                             sort_keys=True).encode())
    digest.update(str(settings.get(CONTENT_DIGEST) or content_digest(data_dir)).encode())
    for row in _manifest_rows(data_dir):
        digest.update("|".join(str(row.get(k)) for k in (
            "patient", "slice", "height", "width", "gland_pixels")).encode())
    return digest.hexdigest()[:12]


def _manifest_rows(data_dir: Path) -> list[dict[str, str]]:
    """The manifest's rows as written (utf-8-sig: one saved by a spreadsheet starts with a
    byte-order mark, which is no part of the first column's name)."""
    with open(data_dir / MANIFEST_FILE, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def checked_output_dir(input_dir: Path, output_dir: Path, overwrite: bool) -> Path:
    """The real place to write to, after refusing any whose writing or replacing could touch
    the source data or a folder that is not a dataset (real locations: symlinks resolved)."""
    real_in, real_out = input_dir.resolve(), output_dir.resolve()
    if real_out.is_relative_to(real_in):
        where = "is" if real_out == real_in else "lies inside"
        raise ConfigError(f"output_dir={output_dir} {where} input_dir={input_dir} (real location "
                          f"{real_in}); prepare never writes into its source data: choose a "
                          "folder outside it")
    if real_in.is_relative_to(real_out):
        raise ConfigError(f"output_dir={output_dir} contains input_dir={input_dir} (real location "
                          f"{real_in}); replacing it would delete the source data: choose "
                          "another folder")
    check_name_fits(real_out)
    check_writable_folder(real_out.parent)  # the dataset is built beside it, then renamed
    if not output_dir.exists():
        return real_out  # (a symlink to a folder still to be made is followed)
    refuse_existing(output_dir, overwrite, f"output_dir={output_dir}")
    if not real_out.is_dir():
        raise DataError(f"output_dir={output_dir}: exists and is not a folder")
    if any(real_out.iterdir()) and not any((real_out / m).is_file() for m in DATASET_MARKERS):
        raise DataError(f"output_dir={output_dir}: not empty and not a dataset made by prepare "
                        f"(no {' or '.join(DATASET_MARKERS)}); overwrite=true only replaces "
                        "prepared datasets: choose another folder or empty it yourself")
    return real_out


def check_sources(cases: list[Case], real_out: Path, output_dir: Path) -> None:
    """Refuse when a scan's real location (through symlinks) lies in the folder to replace."""
    if not real_out.exists():
        return
    for case in cases:
        for source in filter(None, (case.image, case.mask)):
            for path in [source, *(source.rglob("*") if source.is_dir() else ())]:
                if path.resolve().is_relative_to(real_out):
                    raise ConfigError(f"output_dir={output_dir} holds the input scan {path} (real "
                                      f"location {path.resolve()}); replacing it would delete "
                                      "the source data: choose another folder")


def _listed_files(real_out: Path, output_dir: Path) -> set[str]:
    """The content files the dataset's manifest lists (paths inside the dataset): its own."""
    try:
        rows = _manifest_rows(real_out)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        reason = "not found" if isinstance(exc, FileNotFoundError) else f"unreadable ({exc})"
        raise DataError(f"{output_dir / MANIFEST_FILE}: {reason}; without it prepare cannot "
                        "tell its slices from files put there by hand, so overwrite=true "
                        "deletes nothing: delete the old dataset yourself or choose another "
                        "output_dir") from None
    listed = {row.get(column) or "" for row in rows for column in ("image", "mask")}
    return listed | {f"volumes/{row.get('patient')}.npz" for row in rows}


def _foreign_entries(real_out: Path, output_dir: Path) -> list[Path]:
    """What prepare did not make in a dataset: entries of another name, and in its content
    folders anything its manifest does not list (a run folder, predicted masks, a PNG of the
    user's named like a slice)."""
    def litter(path: Path) -> bool:  # LITTER, and macOS's ._ files
        return path.name in LITTER or path.name.startswith("._")

    listed: set[str] | None = None  # read only where there are slices to tell apart
    foreign = []
    for entry in sorted(real_out.iterdir()):
        if entry.name in CONTENT_FOLDERS and entry.is_dir() and not entry.is_symlink():
            for path in sorted(p for p in entry.iterdir() if not litter(p)):
                listed = _listed_files(real_out, output_dir) if listed is None else listed
                if not (path.is_file() and f"{entry.name}/{path.name}" in listed):
                    foreign.append(path)
        elif entry.name not in OWN_ENTRIES and not litter(entry):
            foreign.append(entry)
    return foreign


def check_only_own_entries(real_out: Path, output_dir: Path) -> None:
    """Refuse to replace a dataset that holds what prepare did not make (an evaluate's scores,
    a run folder, at its top or in its slices' folders): replacing deletes the old one whole."""
    if not real_out.is_dir():
        return
    foreign = _foreign_entries(real_out, output_dir)
    if foreign:
        raise DataError(f"{output_dir / foreign[0].relative_to(real_out)}: not made by prepare; "
                        f"overwrite=true would delete it with the old dataset in "
                        f"output_dir={output_dir}: move it out first")


def dataset_holding(path: Path) -> Path | None:
    """The prepared dataset (prepare.json marks one; a run folder's manifest.csv does not) that
    an output at ``path`` would change: one of its own files, or anything in its slices' folders,
    what runs and scores are made of (and what overwrite=true deletes). A new file beside them is
    the user's, which overwrite=true refuses to delete."""
    real = path.resolve()
    for folder in real.parents:
        if (folder / PREPARE_FILE).is_file() and real.relative_to(folder).parts[0] in OWN_ENTRIES:
            return folder
    return None


def prepare(input_dir: str | Path, output_dir: str | Path,
            settings: PrepareSettings = PrepareSettings(), on_error: str = "raise",
            overwrite: bool = False, workers: int = 0) -> dict[str, Any]:
    """Build the PNG dataset; returns the report (counts and skipped cases)."""
    check_on_error(on_error)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    real_out = checked_output_dir(input_dir, output_dir, overwrite)
    started = time.time()
    cases, problems = find_cases(input_dir)
    check_sources(cases, real_out, output_dir)
    check_only_own_entries(real_out, output_dir)
    skipped = [{"case": p.split(":")[0], "reason": p} for p in problems]
    if problems and on_error == "raise":
        raise DataError(problems[0])

    tmp, old = beside(real_out, "partial"), beside(real_out, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    moved = False  # the old dataset renamed aside by this run
    with sigterm_as_interrupt(), new_folders(real_out.parent):  # none left if it stops
        try:
            for sub in CONTENT_FOLDERS:
                (tmp / sub).mkdir(parents=True)
            jobs = (cases, [settings] * len(cases), [tmp] * len(cases))
            if workers > 1:
                with ProcessPoolExecutor(workers, initializer=parent_stops) as pool:
                    results = list(pool.map(_prepare_case, *jobs))
            else:
                results = list(map(_prepare_case, *jobs))
            rows, empty = [], []
            for case, result in zip(cases, results):
                if isinstance(result, str) and on_error == "raise":
                    raise DataError(result)
                if isinstance(result, str):
                    skipped.append({"case": case.patient, "reason": result})
                    continue
                rows.extend(result)
                if not any(row["gland_pixels"] for row in result):
                    empty.append(case.patient)
            if not rows:
                first = skipped[0]["reason"] if skipped else ""
                raise DataError(f"input_dir={input_dir}: no usable case "
                                f"({len(skipped)} skipped: {first})")
            patients = len({row["patient"] for row in rows})
            if len(empty) == patients:
                raise DataError(f"input_dir={input_dir}: no mask holds a single gland voxel "
                                f"(mask_labels={asdict(settings)['mask_labels']}); a network "
                                "trained on it would only learn to predict nothing")
            write_csv(tmp / MANIFEST_FILE, rows, MANIFEST_FIELDS)
            report = {"input_dir": str(input_dir), "patients": patients, "slices": len(rows),
                      "skipped": skipped, "empty_masks": empty,
                      "seconds": round(time.time() - started, 2)}
            write_json(tmp / PREPARE_FILE, {
                **asdict(settings),
                "orientation": "display: row 0 anterior, column 0 patient right",
                "patients": patients, "slices": len(rows), CONTENT_DIGEST: content_digest(tmp)})
            write_json(tmp / REPORT_FILE, report)
            if real_out.exists():
                check_only_own_entries(real_out, output_dir)  # again: the build took a while
                real_out.rename(old)
                moved = True
            tmp.rename(real_out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            if moved and not real_out.exists():  # stopped between the two renames
                old.rename(real_out)
            # the build, or once it is in place the old dataset whose deletion was stopped
            shutil.rmtree(tmp if tmp.exists() else old, ignore_errors=True)
            raise
    for item in skipped:
        log.warning("skipped %s: %s", item["case"], item["reason"])
    if empty:
        log.warning("%d of %d patients have an empty mask (no gland voxel): %s", len(empty),
                    patients, ", ".join(empty))
    log.info("prepared %d patients, %d slices into %s (%d skipped, %.1f s)", patients,
             len(rows), output_dir, len(skipped), report["seconds"])
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    """The task of ``python -m prostate_seg prepare``."""
    return prepare(cfg.input_dir, cfg.output_dir, PrepareSettings.from_config(cfg), cfg.on_error,
                   cfg.overwrite, cfg.workers)
