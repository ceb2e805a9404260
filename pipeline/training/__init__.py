"""Training: the one Trainer builder and `fit` (`trainer`), resuming a killed stage (`resume`), the curves a stage
logs (`curves`), the base objective (`objective`), language modeling for pretrain, SFT and the control (`lm`),
the reward model (`reward`), the logger (`loggers`) and peak FLOP/s for MFU (`hardware`)."""
