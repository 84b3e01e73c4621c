"""ir_lora: parameter-efficient adaptation of pre-trained image-restoration networks in JAX/Flax."""

__version__ = "0.1.0"
