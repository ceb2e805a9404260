"""Exchange with other ecosystems: transformers checkpoints in and out (`hf`)."""
