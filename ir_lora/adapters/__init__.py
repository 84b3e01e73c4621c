"""Adapter maths for AdaptIR, LoRA-IR and UIR-LoRA, attached to backbones through `ir_lora.peft`.

* `adaptir`: the AdaptIR adapter added beside a block's feed-forward path.
* `mixlora`: mixtures of low-rank experts for conv and dense layers (LoRA-IR, UIR-LoRA) and routing.
* `router`: degradation routers (a small trainable CNN, or a frozen user encoder with multi-view
  pooling) that give the routing logits and the degradation embedding.
* `modulation`: LoRA-IR's degradation-aware modulation (DAM) driven by the router embedding.
"""
