"""Scoring a restore function on a config's evaluation sets (tables and images on disk)."""

import logging

from ir_lora import evaluator


def run_evaluation(config, restore_fn, params, datasets, out_dir: str) -> dict:
    """`evaluator.evaluate` with the config's `eval` settings; logs and returns the results."""
    section = config.eval
    results = evaluator.evaluate(
        restore_fn,
        datasets,
        params=params,
        crop_border=section.crop_border,
        test_y_channel=section.test_y_channel,
        tile=section.tile or None,
        tile_overlap=section.tile_overlap,
        pad_multiple=section.pad_multiple,
        out_dir=out_dir,
        save_images=section.save_images,
        save_comparisons=section.save_comparisons,
    )
    logging.info("Evaluation (%s):\n%s", out_dir, evaluator.format_table(results))
    return results
