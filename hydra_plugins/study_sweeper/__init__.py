"""Hydra sweeper ``hydra/sweeper=study`` (the default of ``train.py``): Hydra's basic grid
sweeper that checks every job before the first one starts and names job folders readably."""
