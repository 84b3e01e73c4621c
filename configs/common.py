"""Every config section with its defaults; `configs/*.py` start here and override deltas only.

Sections:
  stage, method: "pretrain" | "finetune" | "contributions" (also "router", "quickstart",
    "allinone": train.py); "full" | "lora" | "colora" | "adaptir" | "moe" (see
    ir_lora/runner.py, ir_lora/methods/), or "multilora" (UIR-LoRA: composes trained LoRA runs;
    its `multilora` section is `ir_lora.uir.run.default_config()`, example in configs/uirlora.py).
  model: `variant` from `ir_lora.models.VARIANTS`, `overrides` of its constructor arguments.
  init: the pre-trained backbone of a fine-tune: `checkpoint` (exported params or a workdir) or
    `torch` (an official `.pth`, with `torch_key` to pick `params`/`params_ema`).
  lora: `rank` and `alpha` (0 = alpha equal to rank, scale 1) for every conv, or explicit ordered
    `targets` of [regex, rank]; `tune_bias_norm` trains biases/norms too; `also_train` lists
    further param-path regexes trained fully.
  full: `train_only`, regexes over "params/..." paths; when given, only those parameters train
    (`ir_lora.methods.full.DECODER_ONLY` is decoder-only tuning).
  colora: CoLoRA (ir_lora/colora/pipeline.py). `ranks`: a ranks JSON from the contributions
    stage; empty: a finetune run computes it first into <workdir>/colora/. Contributions:
    `contribution` "faig" (needs a brief full fine-tune of `probe_steps` at `probe_lr`; FAIG
    with `faig_steps` Riemann steps, `per_image` as the official code) or "grad_norm" (no
    fine-tune), over `num_batches` training batches, reduced per layer by `reduce`/`filter`.
    Ranks: `rule` "delta" | "proportional" under `budget_fraction` of the backbone, with
    `normalize`, `beta`, `delta_min`, `r_min`, `tolerance` (`ir_lora.colora.allocate_ranks`).
    Adapters: `alpha` (0: scale 1), `tune_bias_norm`, `also_train` as for `lora`.
  adaptir: AdaptIR beside every feed-forward path (ir_lora/methods/adaptir.py): hidden width
    `hidden` (0: max(min_hidden, round(width * hidden_ratio)) per block; default ratio 1/24,
    the official IPT adapter's), `rank` (0: hidden // 2),
    channel-gate `reduction`, `norm` ("layer" or "none").
  moe: LoRA-IR (ir_lora/methods/moe.py): `classes` (degradation names, one expert each), expert
    `rank` and `alpha` (0: scale 1), `route` ("top1" | "topk" | "soft") with `top_k`, execution
    `path` ("branches" | "merged"), `train` ("experts" | "backbone"), `modulation` (DAM on),
    its widths: `prior_features` (0: the router embedding's), `dam_hidden` (0: max(1,
    round(C * dam_ratio)) for a stage of C channels), `dam_reduction` (gate squeeze C // it).
  router: the degradation router (ir_lora/routing.py): `checkpoint` (a router workdir),
    `encoder` ("" = the small CNN with `widths`, `embed_dim`; or a registered frozen encoder
    with the multi-view MLP `mlp_widths`).
  prod: the PROD sampler (`ir_lora.degradations.default_config()`), used when pre-training.
  data: training set (`ir_lora.data.prepare` names, see data/README.md), crop `gt_size`, global
    `batch_size`, BasicSR augmentation flags, `noise_sigma` (0..255; 0 = none) for clean sets,
    `worker_count` (input worker processes; -1 = the default for the host).
  eval: datasets evaluated after training (name -> {dataset, source_dir, split, noise_sigma})
    and the BasicSR metric settings.
  The trainer keys (seed, num_train_steps, logging/checkpoint intervals, loss, optimizer, fsdp)
  are documented in `ir_lora.trainer.default_config`.
"""

import ml_collections

from ir_lora import degradations, trainer


def eval_dataset(dataset: str, source_dir: str, split: str = "val", noise_sigma: float = 0.0):
    """One entry of `config.eval.datasets`."""
    return ml_collections.ConfigDict(
        {"dataset": dataset, "source_dir": source_dir, "split": split, "noise_sigma": noise_sigma}
    )


def base_config() -> ml_collections.ConfigDict:
    config = trainer.default_config()
    config.stage = "finetune"
    config.method = "lora"
    config.export = True

    config.model = ml_collections.ConfigDict()
    config.model.variant = "nafnet-sidd-w32"
    config.model.overrides = ml_collections.ConfigDict()

    config.init = ml_collections.ConfigDict()
    config.init.checkpoint = ""
    config.init.torch = ""
    config.init.torch_key = ""

    config.lora = ml_collections.ConfigDict()
    config.lora.rank = 4
    config.lora.alpha = 0.0
    config.lora.targets = ()
    config.lora.tune_bias_norm = True
    config.lora.also_train = ()

    config.full = ml_collections.ConfigDict()
    config.full.train_only = ()

    config.colora = ml_collections.ConfigDict()
    config.colora.ranks = ""
    config.colora.budget_fraction = 0.07
    config.colora.contribution = "faig"
    config.colora.probe_steps = 200
    config.colora.probe_lr = 2e-4
    config.colora.faig_steps = 20
    config.colora.per_image = True
    config.colora.num_batches = 2
    config.colora.reduce = "mean_filter"
    config.colora.filter = "output"
    config.colora.rule = "delta"
    config.colora.normalize = "max"
    config.colora.beta = 0.0
    config.colora.delta_min = 0.0
    config.colora.r_min = 0
    config.colora.tolerance = 0.01
    config.colora.alpha = 0.0
    config.colora.tune_bias_norm = True
    config.colora.also_train = ()

    config.adaptir = ml_collections.ConfigDict()
    config.adaptir.hidden = 0
    config.adaptir.hidden_ratio = 1 / 24
    config.adaptir.min_hidden = 2
    config.adaptir.rank = 0
    config.adaptir.reduction = 4
    config.adaptir.norm = "layer"

    config.moe = ml_collections.ConfigDict()
    config.moe.classes = ("blur", "noise", "rain", "jpeg")
    config.moe.rank = 4
    config.moe.alpha = 0.0
    config.moe.route = "top1"
    config.moe.top_k = 1
    config.moe.path = "branches"
    config.moe.train = "experts"
    config.moe.modulation = True
    config.moe.prior_features = 0
    config.moe.dam_hidden = 0
    config.moe.dam_ratio = 0.25
    config.moe.dam_reduction = 16

    config.router = ml_collections.ConfigDict()
    config.router.checkpoint = ""
    config.router.encoder = ""
    config.router.widths = (16, 32, 64, 64)
    config.router.embed_dim = 64
    config.router.mlp_widths = (768, 384)

    config.prod = degradations.default_config()

    config.data = ml_collections.ConfigDict()
    config.data.dataset = "paired"
    config.data.source_dir = ""
    config.data.data_dir = ""  # prepared TFDS data; default <workdir>/tfds
    config.data.split = "train"
    config.data.gt_size = 256
    config.data.batch_size = 8
    config.data.use_hflip = True
    config.data.use_rot = True
    config.data.noise_sigma = 0.0
    config.data.degrade = ""  # "prod": PROD synthesises the inputs of a fine-tune too
    # grain worker processes that read and crop; -1: none on a CPU-only host, else up to 8
    # (`ir_lora.data.pipeline.default_worker_count`).
    config.data.worker_count = -1

    config.eval = ml_collections.ConfigDict()
    config.eval.datasets = ml_collections.ConfigDict()
    config.eval.crop_border = 0
    config.eval.test_y_channel = False
    config.eval.tile = 0  # 0: whole images
    config.eval.tile_overlap = 32
    config.eval.pad_multiple = 16
    config.eval.save_images = False
    config.eval.save_comparisons = True
    return config


def small_nafnet(config) -> None:
    """The CPU-size NAFNet of the quickstart and the adapter experiments (width 16, 3 levels)."""
    config.model.variant = "nafnet-tiny"
    config.model.overrides.width = 16
    config.model.overrides.enc_blk_nums = (1, 1, 1)
    config.model.overrides.middle_blk_num = 1
    config.model.overrides.dec_blk_nums = (1, 1, 1)


def one_degradation_per_image(config) -> None:
    """PROD applies exactly one of `config.moe.classes` to each training crop (all-in-one data)."""
    config.prod.ops = list(config.moe.classes)
    config.prod.mode = "single"
    config.prod.min_degradations = 1
    config.prod.max_degradations = 1
