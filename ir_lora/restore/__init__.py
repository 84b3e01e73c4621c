"""Restore your own photographs: `Restorer` (the API), `restore_folder` and the command.

    from ir_lora import Restorer
    restorer = Restorer.from_workdir("runs/quickstart/finetune")  # or .from_torch / .from_export
    clean = restorer(hazy_uint8)                                   # (H, W, 3) in, same kind out

    from ir_lora.restore import restore_folder
    restore_folder(restorer, "photos/", "restored/")               # what ir-lora-restore runs

Modules: `restorer` (padding buckets, tiling, automatic tiling by XLA's memory accounting),
`runs` (finished train.py runs as restore functions: the seam to the training layout),
`folder` (inputs to PNGs, progress, skipped files), `files` (discovery, atomic PNG writes),
`memory` (device memory), `cli` (`ir-lora-restore`, `python -m ir_lora.restore`).
"""

from ir_lora.restore.folder import Summary, restore_folder
from ir_lora.restore.restorer import Restorer

__all__ = ["Restorer", "Summary", "restore_folder"]
