"""ir_lora: parameter-efficient adaptation of pre-trained image-restoration networks in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `ir_lora.Restorer` without importing JAX and the models for every `import ir_lora`.
    if name == "Restorer":
        from ir_lora.restore import Restorer

        return Restorer
    raise AttributeError(f"module 'ir_lora' has no attribute {name!r}")
