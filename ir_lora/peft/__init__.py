"""Parameter-efficient fine-tuning, attached to any linen model from outside by module path.

* `intercept`: wrap chosen modules' calls (by "/"-joined path regex and type) without touching
  the model's code; variables of an adapter's own collection at the wrapped module's path.
* `lora`: LoRA factors for every `nn.Conv` / `nn.Dense`, merged-kernel forward, merge/unmerge.
* `mixlora`: several low-rank experts per layer mixed per sample (LoRA-IR, UIR-LoRA).
* `partition`: trainability labels from ordered path rules, checked both ways; split / combine.
* `report`: total / trainable / percent / per-layer ranks of a labelled variable tree.
"""

from ir_lora.peft import intercept, lora, mixlora, partition, report

__all__ = ["intercept", "lora", "mixlora", "partition", "report"]
