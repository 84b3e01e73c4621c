"""LoRA-IR: mixtures of low-rank experts on every conv, routed per image (config `lora_ir`).

Ai et al., "LoRA-IR: Taming Low-Rank Experts for Efficient All-in-One Image Restoration"
(METHODS.md a.1-a.6). A frozen degradation router (`routing`, config section `router`) maps the
degraded input to an embedding and logits; the logits of the experts' classes
(`lora_ir.classes`, one expert per degradation, as in LoRA-IR) become per-image weights
(`lora_ir.route`: "top1", the paper's hard routing; "topk" with renormalisation; "soft"). Every
conv carries one low-rank expert per class (`experts`), and the router embedding drives
degradation-aware modulation of the encoder stages (`modulation`).

The paper's three training stages, each a `train.py` run (configs/lora_ir_*.py):

1. stage `lora_ir_router`: the router alone (`router_stage`).
2. `lora_ir.train = "backbone"`: the backbone and the modulation train, conditioned on the
   frozen router's embedding (stage `pretrain` from scratch with PROD, or `finetune`).
3. `lora_ir.train = "experts"`: only the experts and the modulation train; the backbone (from
   stage 2's `export/variables`, with its modulation) and the router are frozen. (The released
   code also unfreezes the backbone here, METHODS.md a.2; this follows the paper.)

Stage `lora_ir_allinone` (`allinone`) runs all three offline and scores a mixed-degradation test
set per degradation. The checkpoints of stages 2 and 3 hold only what trains; they reference
(path and sha256) the frozen backbone they started from and the router, and a restored run
takes the recorded router when `router.checkpoint` is empty.
"""

import ml_collections

from ir_lora.methods.base import MethodSpec, Reference
from ir_lora.methods.lora_ir import routing
from ir_lora.methods.lora_ir.experts import (
    EXPERTS,
    MODULATION,
    PRIOR,
    ROUTER,
    TRAIN_MODES,
    attach_rules,
    dam_width,
    load,
    parts,
    trainability_rules,
)

__all__ = [
    "EXPERTS",
    "MODULATION",
    "PRIOR",
    "ROUTER",
    "SPEC",
    "TRAIN_MODES",
    "attach_rules",
    "dam_width",
    "default_config",
    "trainability_rules",
]


def default_config() -> ml_collections.ConfigDict:
    """The `lora_ir` section.

    `classes` (degradation names, one expert each), expert `rank` and `alpha` (0: scale 1),
    `route` ("top1" | "topk" | "soft") with `top_k`, execution `path` ("branches" | "merged"),
    `train` ("experts" | "backbone"), `modulation` (DAM on), its widths: `prior_features` (0:
    the router embedding's), `dam_hidden` (0: `max(1, round(C * dam_ratio))` for a stage of C
    channels), `dam_reduction` (gate squeeze C // it).
    """
    return ml_collections.ConfigDict(
        {
            "classes": ("blur", "noise", "rain", "jpeg"),
            "rank": 4,
            "alpha": 0.0,
            "route": "top1",
            "top_k": 1,
            "path": "branches",
            "train": "experts",
            "modulation": True,
            "prior_features": 0,
            "dam_hidden": 0,
            "dam_ratio": 0.25,
            "dam_reduction": 16,
        }
    )


SPEC = MethodSpec(
    parts=parts,
    sections={"lora_ir": default_config, "router": routing.default_config},
    trains_backbone=lambda config: config.lora_ir.train == "backbone",
    load=load,
    references={ROUTER: Reference(field="router.checkpoint", resolve=routing.router_dir)},
)
