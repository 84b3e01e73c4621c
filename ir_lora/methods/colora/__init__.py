"""CoLoRA: LoRA with a per-layer rank read from a ranks file (config section `colora`).

The ranks come from the `contributions` stage (`ir_lora.colora.pipeline`): FAIG (or gradient
norm) contributions of each layer to the new task, turned into ranks under a parameter budget
(`budget_fraction`, ~7% for NAFNet in the paper). A layer with rank 0, or absent from the file,
gets no adapter. Biases and norms train too with `tune_bias_norm` (the allocation counted them
against the budget, so the setting must match the file's). Everything else is frozen and the
checkpoints hold only the trainable tree, as for `lora`.

With `colora.ranks` empty, `prepare` fills it in: a training run computes the ranks first into
`<workdir>/colora/` (brief full fine-tune, FAIG, allocation: `ir_lora.colora.pipeline`), a
restored run reads the ranks it computed there.
"""

from flax import linen as nn

from ir_lora.colora import files
from ir_lora.methods import lora
from ir_lora.methods.base import MethodSpec, Parts
from ir_lora.peft import lora as lora_lib


def lora_config(section) -> lora_lib.LoraConfig:
    """`LoraConfig` with one exact-path target per layer of the section's ranks file."""
    path = section.get("ranks", "")
    if not path:
        raise ValueError(
            "method='colora' needs config.colora.ranks (a ranks JSON written by the "
            "contributions stage); train.py / runner.train_and_evaluate fill it in when empty"
        )
    payload = files.read_ranks_file(path)
    if bool(payload.get("tune_bias_norm", True)) != bool(section.tune_bias_norm):
        raise ValueError(
            f"CoLoRA ranks file {path!r} was allocated with tune_bias_norm="
            f"{payload.get('tune_bias_norm')} but config.colora.tune_bias_norm="
            f"{section.tune_bias_norm}: the budget would not mean the same; set them equal"
        )
    alpha = section.get("alpha")
    return lora_lib.LoraConfig(
        targets=lora_lib.targets_from_ranks(payload["ranks"]),
        alpha=float(alpha) if alpha else None,
    )


def parts(config, model: nn.Module, sample) -> Parts:
    return lora.parts_for(lora_config(config.colora), config.colora, model, sample)


def prepare(config, workdir: str, *, training: bool):
    """`config` with `colora.ranks` set: as given, or the run's own (computed when training)."""
    from ir_lora.colora import pipeline  # It imports the runner, which imports this package.

    return pipeline.with_ranks(config, workdir, compute_missing=training)


SPEC = MethodSpec(parts=parts, prepare=prepare)
