"""Using a trained model: batched sampling with a KV cache (`sampling`), prompt|response batches for scoring
(`sequences`), prompting templates and few-shot exemplars (`prompting`) and a chat (`chat`)."""
