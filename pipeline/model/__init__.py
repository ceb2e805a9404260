"""The model: the GPT (`gpt`), its shape and config group (`config`), the KV cache, the scalar head of reward
models and critics (`heads`), log-probabilities of responses (`logprobs`) and the named checkpoints stages
hand to each other (`handoff`). Import from the submodules: this package imports nothing, so that reading a
config never imports torch."""
