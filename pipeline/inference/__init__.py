"""Using a trained model: batched sampling with a KV cache."""
