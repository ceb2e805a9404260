"""Alignment of the SFT model: the generic stage (`align`), the RL toolkit (`rollout`) and the methods, one
module each (`methods`)."""
