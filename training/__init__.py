"""Training side of DPSN-R: data pipeline, trainer, pool optimizer."""
