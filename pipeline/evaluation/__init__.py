"""Scoring checkpoints and writing the lifecycle report."""
