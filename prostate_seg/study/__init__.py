"""Study stage: run folders and their identity, sweep job names, and the report that turns a
sweep (or any per-patient table) into a verdict with tables and figures."""
