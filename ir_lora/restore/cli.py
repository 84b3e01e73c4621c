"""`ir-lora-restore` (also `python -m ir_lora.restore`): restore your own photographs to PNGs.

  ir-lora-restore --input photos/ --output restored/ --workdir runs/quickstart
  ir-lora-restore --input big.jpg --output out/ --torch NAFNet-SIDD-width32.pth \\
      --variant nafnet-sidd-w32 --tile 512 --tile_overlap 32
  ir-lora-restore --input photos/ --output out/ --adapter haze=runs/haze --adapter rain=runs/rain

The model comes from exactly one of `--workdir` (a finished train.py run), `--export` (exported
params), `--torch` (an official .pth) or `--adapter NAME=WORKDIR` repeated (runs fine-tuned
from one backbone; outputs in OUTPUT/NAME/). Exit status: 0 when every image was written, 1 when
some input was skipped (each one is reported), 2 for bad arguments or a model that cannot load.
"""

import argparse
import importlib.util
import json
import logging
import os
import sys

from ir_lora.data.images import ImageError

EXIT_OK, EXIT_SKIPPED, EXIT_ERROR = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ir-lora-restore",
        description="Restore photographs (a file or a folder, recursively) to PNGs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--output", required=True, help="folder for the PNGs (mirrors --input)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a finished train.py run (or a quickstart workdir)")
    source.add_argument("--export", help="exported params (<workdir>/export/params)")
    source.add_argument("--torch", help="official PyTorch weights (.pth); needs --variant")
    source.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=WORKDIR",
        help="a run fine-tuned from the shared backbone; repeat for several",
    )
    p.add_argument("--variant", help="model variant (ir_lora.models.VARIANTS)")
    p.add_argument("--overrides", default="{}", help="JSON of model constructor overrides")
    p.add_argument("--torch_key", help="entry of the .pth holding the weights, e.g. params_ema")
    p.add_argument("--backbone", help="where a run's backbone lives now, if it moved")
    p.add_argument("--config", help="FILE[:ARG]: this config instead of the one the run recorded")
    p.add_argument("--tile", type=int, help="tile side (default: whole images that fit)")
    p.add_argument("--tile_overlap", type=int, help="minimum tile overlap (default 32)")
    p.add_argument("--batch_size", type=int, help="tiles per network call (default 4)")
    p.add_argument(
        "--reflect_pad",
        type=int,
        help="reflect-pad images to a multiple of this first; 0: the network's own zero "
        "padding (default: as the source's official inference or the run's eval.py)",
    )
    p.add_argument("--memory_limit_gb", type=float, help="memory whole images may use")
    p.add_argument("--save_16bit", action="store_true", help="write 16-bit PNGs")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    existing.add_argument(
        "--skip_existing", action="store_true", help="keep existing outputs, restore the rest"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress logs")
    return p


def load_config(spec: str):
    """`get_config(arg)` of a config file given as `FILE[:ARG]`."""
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config: no file {path!r}")
    module_spec = importlib.util.spec_from_file_location("ir_lora_restore_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _adapters(specs: list[str]) -> dict[str, str]:
    named = {}
    for spec in specs:
        name, sep, workdir = spec.partition("=")
        if not sep or not name or not workdir or os.sep in name or name in (".", ".."):
            raise ValueError(f"--adapter {spec!r}: expected NAME=WORKDIR with a plain NAME")
        if name in named:
            raise ValueError(f"--adapter: the name {name!r} is given twice")
        named[name] = workdir
    return named


def build_models(args):
    """A `Restorer`, or `{name: Restorer}` for `--adapter`, from the parsed arguments."""
    from ir_lora.restore import runs
    from ir_lora.restore.restorer import Restorer

    options = {}
    if args.tile_overlap is not None:
        options["tile_overlap"] = args.tile_overlap
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if args.reflect_pad is not None:
        options["reflect_multiple"] = args.reflect_pad or None
    if args.memory_limit_gb is not None:
        options["memory_limit"] = int(args.memory_limit_gb * 2**30)
    overrides = json.loads(args.overrides)
    config = load_config(args.config) if args.config else None
    if (args.torch or args.export) and (args.backbone or args.config):
        raise ValueError("--backbone and --config apply to --workdir and --adapter runs only")
    if args.torch:
        if not args.variant:
            raise ValueError("--torch needs --variant (ir_lora.models.VARIANTS)")
        return Restorer.from_torch(
            args.torch, args.variant, key=args.torch_key, overrides=overrides, **options
        )
    if (args.variant or args.torch_key or args.overrides != "{}") and not args.export:
        raise ValueError("--variant, --overrides and --torch_key go with --torch / --export")
    if args.export:
        return Restorer.from_export(args.export, args.variant, overrides=overrides, **options)
    if args.workdir:
        return Restorer.from_workdir(args.workdir, backbone=args.backbone, config=config, **options)
    named = _adapters(args.adapter)
    trained = runs.load_adapters(named, backbone_path=args.backbone, config=config)
    return {name: Restorer.from_run(run, name=name, **options) for name, run in trained.items()}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(message)s",
        force=True,
    )
    from ir_lora import checkpointing
    from ir_lora.restore import folder

    try:
        models = build_models(args)
        summary = folder.restore_folder(
            models,
            args.input,
            args.output,
            tile=args.tile,
            tile_overlap=args.tile_overlap,
            batch_size=args.batch_size,
            save_16bit=args.save_16bit,
            overwrite=args.overwrite,
            skip_existing=args.skip_existing,
            progress=False if args.quiet else None,
        )
    except (
        ImageError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
        KeyError,
        MemoryError,
        checkpointing.ReferenceMismatchError,
    ) as error:
        print(f"ir-lora-restore: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(summary.describe())
    print(f"Restored images: {summary.output}")
    return EXIT_SKIPPED if summary.failed else EXIT_OK


def run() -> None:
    """The console-script entry point."""
    sys.exit(main())
