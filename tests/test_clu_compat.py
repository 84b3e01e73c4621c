"""clu's writers work without TensorFlow; what they write lands in a TensorBoard event file.

These tests fail if a clu release moves or renames what ir_lora.clu_compat replaces.
"""

import io
import time

import numpy as np
import tiny_training as tiny
from PIL import Image

from ir_lora import clu_compat
from ir_lora.clu_compat import metric_writers, periodic_actions


def _values(events):
    return {(v.tag, e.step): v for e in events if e.HasField("summary") for v in e.summary.value}


def test_default_writer_uses_the_tensorboardx_writer(tmp_path):
    assert clu_compat.install() is True  # idempotent; TensorFlow is not installed here
    assert metric_writers.SummaryWriter is clu_compat.TensorboardXSummaryWriter
    assert issubclass(clu_compat.TensorboardXSummaryWriter, metric_writers.MetricWriter)
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    kinds = [type(w).__name__ for w in writer._writers]
    assert kinds == ["LoggingWriter", "TensorboardXSummaryWriter"]
    only_logs = metric_writers.create_default_writer(
        str(tmp_path), just_logging=True, asynchronous=False
    )
    assert [type(w).__name__ for w in only_logs._writers] == ["LoggingWriter"]


def test_scalars_images_histograms_hparams_land_in_the_event_file(tmp_path):
    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    image = np.zeros((5, 7, 3), np.float32)
    image[..., 0] = 1.0  # pure red
    writer.write_hparams({"optimizer": {"lr": 1e-3, "name": "adamw"}, "fsdp": 1})
    writer.write_scalars(3, {"train_loss": 0.25})
    writer.write_images(3, {"restored": image})
    writer.write_histograms(3, {"weights": np.arange(100.0)}, num_buckets={"weights": 10})
    progress = periodic_actions.ReportProgress(num_train_steps=10, writer=writer, every_steps=2)
    progress(1)
    time.sleep(0.01)
    progress(2)
    writer.flush()

    values = _values(tiny.read_events(str(tmp_path)))
    assert values[("train_loss", 3)].simple_value == 0.25
    encoded = values[("restored", 3)].image
    assert (encoded.height, encoded.width) == (5, 7)
    pixels = np.asarray(Image.open(io.BytesIO(encoded.encoded_image_string)))
    assert pixels.shape[:2] == (5, 7)
    np.testing.assert_array_equal(pixels[..., :3].reshape(-1, 3)[0], [255, 0, 0])
    histogram = values[("weights", 3)].histo
    assert (histogram.min, histogram.max, histogram.num) == (0.0, 99.0, 100)
    assert values[("steps_per_sec", 2)].simple_value > 0
    hparams = [tag for tag, _ in values if tag.startswith("_hparams_/")]
    assert "_hparams_/session_start_info" in hparams
    start = values[("_hparams_/session_start_info", 0)].metadata.plugin_data
    assert start.plugin_name == "hparams" and b"optimizer.lr" in start.content
