"""Hydra sweeper ``hydra/sweeper=optuna_repeated``: an Optuna search (hydra-optuna-sweeper)
whose trials each train several folds and seeds, scored from their results.json, and which
resumes an interrupted study where it stopped."""
