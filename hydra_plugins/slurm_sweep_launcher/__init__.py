"""Hydra launcher ``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher that waits for
every array task, so one task that dies does not end the sweep while the others run."""
