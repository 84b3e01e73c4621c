"""clu's metric writers and periodic actions without TensorFlow.

`clu.metric_writers` (and `clu.periodic_actions`, which imports it) load
`clu.metric_writers.tf.summary_writer`, which imports TensorFlow. When TensorFlow is not
installed, this module registers a stand-in for that one module, whose `SummaryWriter` writes the
same TensorBoard event files with tensorboardX, before clu is imported. Everything else in clu is
used unchanged, so `create_default_writer` keeps returning clu's usual logging + summary writers.

Import clu's writers through this module:

  from ir_lora.clu_compat import metric_writers, periodic_actions
"""

import importlib.util
import logging
import os
import sys
import time
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

_TF_WRITER_MODULE = "clu.metric_writers.tf.summary_writer"


class TensorboardXSummaryWriter:
    """clu `MetricWriter` writing TensorBoard event files with tensorboardX's summary protos.

    Events are appended synchronously (tensorboardX's own `SummaryWriter.flush()` does not drain
    its background queue, so clu's "flush means written" would not hold); clu's
    `AsyncMultiWriter` adds asynchrony where wanted. Implements the methods of
    `clu.metric_writers.interface.MetricWriter` (registered as a virtual subclass); raw tensor
    summaries, videos and audio are skipped with a warning, as clu's own writer does for videos.
    """

    def __init__(self, logdir: str):
        from tensorboardX import event_file_writer, record_writer

        record_writer.directory_check(logdir)
        self._events = event_file_writer.EventsWriter(os.path.join(logdir, "events"))

    def _write(self, summary, step: int | None = None) -> None:
        from tensorboardX.proto import event_pb2

        event = event_pb2.Event(summary=summary, wall_time=time.time())
        if step is not None:
            event.step = int(step)
        self._events.write_event(event)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata=None):
        del step, metadata
        logging.warning("TensorboardXSummaryWriter skips raw summaries: %s", sorted(values))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        from tensorboardX import summary

        for key, value in scalars.items():
            self._write(summary.scalar(key, float(np.asarray(value))), step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        from tensorboardX import summary

        # Like clu: (H, W, C) or a batch (N, H, W, C) shown as a grid; float in [0, 1] or uint8.
        for key, value in images.items():
            value = np.asarray(value)
            if value.ndim == 3:
                value = value[None]
            self._write(summary.image(key, value, dataformats="NHWC"), step)

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        del step
        logging.warning("TensorboardXSummaryWriter skips videos: %s", sorted(videos))

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        del step, sample_rate
        logging.warning("TensorboardXSummaryWriter skips audio: %s", sorted(audios))

    def write_texts(self, step: int, texts: Mapping[str, str]):
        from tensorboardX import summary

        for key, value in texts.items():
            self._write(summary.text(key, value), step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None):
        from tensorboardX import summary

        for key, value in arrays.items():
            # 30 buckets is tf.summary.histogram's default, which clu's own writer uses.
            buckets = (num_buckets or {}).get(key) or 30
            self._write(summary.histogram(key, np.asarray(value), bins=buckets), step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        from clu.internal import utils as clu_utils
        from tensorboardX import summary

        flat = {
            key: value if isinstance(value, str | bool | int | float) else str(value)
            for key, value in clu_utils.flatten_dict(hparams)
        }
        # Into this run's event file; tensorboardX's add_hparams would open a new sub-run.
        for proto in summary.hparams(flat, {}):
            self._write(proto)

    def flush(self):
        self._events.flush()

    def close(self):
        self._events.close()


def install() -> bool:
    """Registers the TensorFlow-free writer module for clu unless TensorFlow is importable.

    Idempotent. Must run before the first `import clu.metric_writers`.

    Returns:
      True if the stand-in is (now) registered, False if TensorFlow is available.

    Raises:
      RuntimeError: if clu's writers were already imported without it (and without TensorFlow).
    """
    existing = sys.modules.get(_TF_WRITER_MODULE)
    if existing is not None:
        return getattr(existing, "SummaryWriter", None) is TensorboardXSummaryWriter
    if importlib.util.find_spec("tensorflow") is not None:
        return False
    if "clu.metric_writers" in sys.modules:
        raise RuntimeError(
            "clu.metric_writers was imported before ir_lora.clu_compat.install(); import clu's "
            "writers through ir_lora.clu_compat"
        )
    stand_in = types.ModuleType(_TF_WRITER_MODULE, doc="TensorFlow-free stand-in (ir_lora).")
    stand_in.SummaryWriter = TensorboardXSummaryWriter
    sys.modules[_TF_WRITER_MODULE] = stand_in
    # Importing clu's interface module runs clu.metric_writers/__init__, which needs the stand-in
    # first; hence a virtual subclass instead of inheritance.
    from clu.metric_writers import interface

    interface.MetricWriter.register(TensorboardXSummaryWriter)
    return True


install()

from clu import metric_writers, periodic_actions  # noqa: E402

__all__ = ["TensorboardXSummaryWriter", "install", "metric_writers", "periodic_actions"]
