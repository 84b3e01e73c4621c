"""The data a config names: this process's training iterator and the evaluation sets.

Datasets are prepared once into `config.data.data_dir` (default `<workdir>/tfds`) by
`ir_lora.data.prepare` and read with the grain pipelines of `ir_lora.data.pipeline`.
"""

import os
from typing import Any

from ir_lora.data import pipeline
from ir_lora.data import prepare as prepare_dataset


def data_dir(config, workdir: str) -> str:
    """Where the config's prepared datasets live (`data.data_dir`, default `<workdir>/tfds`, also
    for a config without training data)."""
    data = config.get("data", None)
    return (data.get("data_dir", "") if data else "") or os.path.join(workdir, "tfds")


def _noise_sigma(section) -> float | None:
    sigma = section.get("noise_sigma", 0.0)
    return float(sigma) if sigma else None


def train_iterator(config, workdir: str):
    """This process's grain iterator over the training data (checkpointable state)."""
    source = prepare_dataset(
        config.data.dataset,
        source_dir=config.data.source_dir,
        data_dir=data_dir(config, workdir),
        split=config.data.split,
    )
    dataset = pipeline.train_dataset(
        source,
        gt_size=config.data.gt_size,
        global_batch_size=config.data.batch_size,
        seed=config.seed,
        use_hflip=config.data.use_hflip,
        use_rot=config.data.use_rot,
        noise_sigma=_noise_sigma(config.data),
        worker_count=config.data.get("worker_count", 0),
    )
    return iter(dataset)


def eval_datasets(config, workdir: str, names=None) -> dict[str, Any]:
    """`config.eval.datasets` (optionally only `names`) as evaluator inputs."""
    specs = dict(config.eval.datasets)
    if names:
        unknown = sorted(set(names) - set(specs))
        if unknown:
            raise ValueError(f"Unknown eval datasets {unknown}; configured: {sorted(specs)}")
        specs = {name: specs[name] for name in names}
    out = {}
    for name, spec in specs.items():
        source = prepare_dataset(
            spec.dataset,
            source_dir=spec.source_dir,
            data_dir=data_dir(config, workdir),
            split=spec.get("split", "val"),
        )
        sigma = _noise_sigma(spec)
        out[name] = pipeline.eval_dataset(source, noise_sigma=sigma) if sigma else source
    return out
