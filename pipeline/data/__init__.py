"""Synthetic data for the pipeline: the invented world (`world`), task families, eval partition
and checker (`tasks`), and the stage that writes every split (`prepare`)."""
