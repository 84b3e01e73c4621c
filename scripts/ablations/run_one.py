"""One cached run of the ablations, e.g. to spread the runs of one `--root` over processes.

  python -m scripts.ablations.run_one --pretraining prod --task haze --num-pairs 16 \
      --tuning colora

Takes the flags of the ablation scripts (same `--root`, same sizes) and prints the result row;
a run another process has started is waited for, not repeated.
"""

import json

from scripts.ablations import common


def main():
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--pretraining", default="prod", choices=common.PRETRAININGS)
    parser.add_argument("--task", default="haze", choices=common.TASKS)
    parser.add_argument("--num-pairs", type=int, default=16)
    parser.add_argument("--tuning", default="full", choices=("none", *common.TUNINGS))
    args = parser.parse_args()
    common.setup_logging()
    result = common.finetune(
        args,
        pretraining=args.pretraining,
        task=args.task,
        num_pairs=args.num_pairs,
        tuning=args.tuning,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
