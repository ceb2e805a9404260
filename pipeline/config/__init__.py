"""The configuration: every config group's schema, the whole of them (`root.Config`), composing and loading
them (`load`), and the identity of a run (`identity`).

One module per family of groups: `model`, `data` (data and tokenizer), `training` (pretrain, sft, reward,
trainer, strategy, resume, logger), `evaluate`, `align` (what every alignment method's config has; each
method's own fields are in its module, pipeline/alignment/methods). `schema` is their base. This package
imports nothing heavy: every stage loads it before any work.
"""
