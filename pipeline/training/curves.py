"""What a training stage logged, kept in memory for the stage's summary metrics.

The curves on disk are the loggers' (DVCLive's dvclive/<stage>/ are the DVC plots and the report's figures,
pipeline.training.loggers); `CurveRecorder` keeps the same scalars per step in the process, whatever loggers
are configured, with the run's totals, and `mean_of` and `first_last` summarise them into a stage's metrics.
"""
from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pipeline.training.hardware import describe_device


def mean_of(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else None


def first_last(rows: list[dict], keys: tuple[str, ...]) -> dict[str, float | None]:
    """Each key's mean over the first and the last quarter of the logged rows: `<key>_first`, `<key>`."""
    n = max(1, len(rows) // 4)
    out: dict[str, float | None] = {}
    for key in keys:
        out[f"{key}_first"] = mean_of(rows[:n], key)
        out[key] = mean_of(rows[-n:], key)
    return out


class CurveRecorder(Callback):
    """Keeps every logged scalar per step (`train`, `val`: lists of {"step": n, metric: value}) and the run's
    totals, for the stage's metrics. `totals` is {"device": what it trained on, "tokens": the tokens of every
    training batch, all ranks together}, for the stage's metrics and the report.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.train: list[dict] = []
        self.val: list[dict] = []
        self.val_keys: set[str] = set()
        self.totals: dict[str, str | int | None] = {}

    @staticmethod
    def _row(trainer: L.Trainer, keep) -> dict:
        row = {"step": int(trainer.global_step)}
        for key, value in trainer.callback_metrics.items():
            if keep(key) and value.numel() == 1:
                row[key] = round(float(value), 6)
        return row

    def state_dict(self) -> dict:  # a resumed run continues the curves of the killed one
        return {"train": self.train, "val": self.val, "val_keys": sorted(self.val_keys)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train, self.val, self.val_keys = state_dict["train"], state_dict["val"], set(state_dict["val_keys"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0 or (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            row = self._row(trainer, lambda k: k not in self.val_keys)
            if len(row) > 1 and (not self.train or self.train[-1]["step"] != row["step"]):
                self.train.append(row)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            row = self._row(trainer, lambda k: k.startswith("val/"))
            self.val_keys.update(row)
            if len(row) > 1 and (not self.val or self.val[-1]["step"] != row["step"]):
                self.val.append(row)

    def on_train_end(self, trainer, pl_module) -> None:
        counted = getattr(pl_module, "tokens_trained", None)  # set by pipeline.training.objective.Objective
        tokens = None
        if counted is not None:
            tokens = torch.as_tensor(counted, device=pl_module.device)
            if trainer.world_size > 1:  # a collective: every rank reaches on_train_end
                tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
            tokens = int(tokens)
        self.totals = {"device": describe_device(pl_module.device, trainer.world_size), "tokens": tokens}
