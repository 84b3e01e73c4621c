"""UIR-LoRA: separately trained LoRAs, one per degradation, composed per image (stage `uir_lora`).

It adapts no backbone itself, so it is a stage, not an entry of the method registry: the LoRAs
are ordinary `method = lora` runs on the same backbone, and the `uir_lora` stage composes them.

* `compose`: the N LoRAs stacked and applied with per-image weights (branches or merged kernels),
  attached through the same interceptors as `peft.lora`; built on `peft.mixlora`.
* `prototypes`: degradation embedding (`ir_lora.routers.DegradationEncoder`, trained through the
  trainer on the LoRAs' own degraded images), one prototype per degradation, top-K similarity
  weights.
* `stage`: the `uir_lora` stage of `train.py` / `eval.py` (load the LoRA runs, train the
  encoder, save, evaluate against every single LoRA).
* `experiment`, `oracle`: the CPU-size experiment of docs/results_uirlora.md.
"""

import ml_collections

__all__ = ["default_config"]


def default_config() -> ml_collections.ConfigDict:
    """The `uir_lora` section: the runs to compose, the encoder and the composition.

    `runs`: name -> workdir of a `method = lora` run; `k`, `temperature`, `normalize`, `center`:
    the top-k similarity composition (`prototypes.composition_weights`); `path`: "branches" or
    "merged" (per-image kernels); `encoder`: the degradation encoder's `widths` and `embed_dim`,
    and its training crops (`crop`, `batch_size`; steps and learning rate are the trainer's
    `num_train_steps` and `optimizer`).
    """
    c = ml_collections.ConfigDict()
    c.runs = ml_collections.ConfigDict()
    c.k = 2
    c.temperature = 0.1
    c.normalize = "softmax"
    c.center = True
    c.path = "branches"
    c.encoder = ml_collections.ConfigDict(
        {"widths": (16, 32, 64), "embed_dim": 64, "batch_size": 16, "crop": 64}
    )
    return c
