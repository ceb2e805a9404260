"""Scoring checkpoints (`evaluate`: the stage and its verdict, `metrics`) and writing the lifecycle report
(`report`, `figures`)."""
