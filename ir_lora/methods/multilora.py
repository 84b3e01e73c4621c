"""UIR-LoRA: trained `lora` runs composed per image by a degradation router (section `multilora`).

A stage of its own rather than adapters on a backbone: `train.py` trains the router over the
runs named in `config.multilora.runs` and evaluates the composition, `eval.py --workdir` repeats
the evaluation from what that run saved. Both live in `ir_lora.uir.run`; this module only
registers them.
"""

from ir_lora.methods.base import MethodSpec


def train_and_evaluate(config, workdir: str) -> dict:
    from ir_lora.uir import run  # It imports the runner, which imports this package.

    return run.train_and_evaluate(config, workdir)


def evaluate(config, workdir: str, *, datasets=None, out_dir=None) -> dict:
    from ir_lora.uir import run

    return run.evaluate(config, workdir, datasets=datasets, out_dir=out_dir)


SPEC = MethodSpec(parts=None, train_and_evaluate=train_and_evaluate, evaluate=evaluate)
