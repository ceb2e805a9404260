"""GPT lifecycle pipeline."""
