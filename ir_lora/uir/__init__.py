"""UIR-LoRA (`method = multilora`): one LoRA per degradation, composed per image.

* `compose`: the N LoRAs stacked and applied with per-image weights (branches or merged kernels),
  attached through the same interceptors as `peft.lora`; built on `adapters.mixlora`.
* `routing`: degradation embedding (`adapters.router.DegradationEncoder`, trained on the LoRAs'
  own degraded images), one prototype per degradation, top-K similarity weights.
* `run`: the `multilora` stage of `train.py` / `eval.py` (load the LoRA runs, train the router,
  save, evaluate against every single LoRA).
* `data`, `oracle`: the CPU-size experiment of docs/results_uirlora.md.
"""
