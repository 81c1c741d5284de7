"""Data stage: scans -> display slices (volume, resize, dicom, prepare), the PNG dataset, the
patient split and the loaders (datamodule). Nothing is imported here: ``prepare`` and the
split must not pay for torch and Lightning."""
