"""One LightningModule per training objective; each wraps the same GPT."""
