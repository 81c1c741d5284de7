"""The Hydra configs. A checkout reads them here; an installed package ships them as
``prostate_seg.conf``, which Hydra finds as ``pkg://prostate_seg.conf``."""
