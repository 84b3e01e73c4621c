"""Test helpers: a tiny conv-net method, a deterministic data iterator, an event-file reader.

Also a script: `python tiny_training.py WORKDIR NUM_STEPS DELAY_S` trains it with checkpoints
every 2 steps (sleeping DELAY_S per batch, so that a test can kill it mid-run) and writes the
final trainable parameters to `WORKDIR/final.npz`.
"""

import glob
import os
import struct
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from tensorboardX.proto import event_pb2

from ir_lora import train_lib, trainer

SIZE = 8


def _flat_normal(key, shape, dtype=jnp.float32):
    # Drawn 1-D and reshaped: XLA:CPU compiles (partitionable) threefry for an N-D shape about
    # 6x slower than for a flat one, and compile time is most of these tests' time.
    return 0.2 * jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


class TinyNet(nn.Module):
    """Residual 2-conv net: enough structure for a frozen and a trainable part."""

    features: int = 4

    @nn.compact
    def __call__(self, x):
        conv = lambda features, name: nn.Conv(features, (3, 3), kernel_init=_flat_normal, name=name)
        h = nn.relu(conv(self.features, "conv_in")(x))
        return x + conv(x.shape[-1], "conv_out")(h)


def make_method(*, frozen_names=("conv_in",), degrade=False, features=4) -> train_lib.Method:
    model = TinyNet(features=features)

    def init_fn(rng):
        params = model.init(rng, jnp.zeros((1, SIZE, SIZE, 3)))["params"]
        frozen = {k: v for k, v in params.items() if k in frozen_names}
        trainable = {k: v for k, v in params.items() if k not in frozen_names}
        return trainable, frozen

    def apply_fn(trainable, frozen, images):
        return model.apply({"params": {**trainable, **frozen}}, images)

    def degrade_fn(rng, clean):
        noise = _flat_normal(rng, clean.shape)
        return clean + 0.5 * noise, None

    return train_lib.Method(init_fn, apply_fn, degrade_fn if degrade else None)


class CountingIterator:
    """Batch `i` is a pure function of `(seed, i)`; its state is the position `i`."""

    def __init__(self, *, batch_size=8, seed=0, nan_at=None, delay=0.0, only_gt=False):
        self.batch_size, self.seed, self.nan_at = batch_size, seed, nan_at
        self.delay, self.only_gt, self.position = delay, only_gt, 0

    def __iter__(self):
        return self

    def __next__(self):
        index = self.position
        self.position += 1
        if self.delay:
            time.sleep(self.delay)
        rng = np.random.default_rng([self.seed, index])
        gt = rng.random((self.batch_size, SIZE, SIZE, 3), dtype=np.float32)
        if index == self.nan_at:
            gt[0, 0, 0, 0] = np.nan
        if self.only_gt:
            return {"gt": gt}
        noise = rng.normal(0.0, 0.1, gt.shape).astype(np.float32)
        return {"lq": np.clip(gt + noise, 0.0, 1.0), "gt": gt}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = int(state["position"])


def read_events(logdir):
    """All `Event` protos of the event files in `logdir` (TFRecord framing, CRCs skipped)."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            record = data[offset + 12 : offset + 12 + length]
            offset += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(record)
            events.append(event)
    return events


def small_config(num_train_steps: int) -> ml_collections.ConfigDict:
    config = trainer.default_config()
    config.num_train_steps = num_train_steps
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.max_to_keep = 10
    config.loss = "l1"
    config.optimizer.lr = 1e-2
    config.optimizer.warmup_steps = 1
    config.optimizer.grad_clip_norm = 1.0
    return config


def main(workdir: str, num_steps: int, delay: float) -> None:
    state, _ = trainer.train(
        small_config(num_steps),
        workdir,
        method=make_method(),
        data_iterator=CountingIterator(delay=delay),
    )
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree.leaves_with_path(state)}
    np.savez(f"{workdir}/final.npz", **flat)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
