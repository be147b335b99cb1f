"""Model-card templates that hf-moe's converters fill (rendered with huggingface_hub's `ModelCard`)."""
