"""Hydra launcher ``hydra/launcher=gpu_pool``: sweep jobs run concurrently, one fresh process per
GPU (or CPU slot), so each job is pinned to its device before CUDA starts in it."""
