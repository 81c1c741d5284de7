"""Training stage: the LightningModule, its callbacks and loggers, the config check and the fit
of one run (``fit.train``)."""
