"""What wraps every stage, on top of the chain: the typed config (`config`), the runner, checks of a stage's
inputs (`validation`), its W&B run and lineage (`tracking`, `wandb_mode`), Hydra sweeps (`sweep`), and the
tools that keep dvc.yaml the chain's (`dvcfile`, `imports`)."""
