"""Parameter-efficient fine-tuning attached to any `flax.linen` model from outside."""
