"""One cached run of the ablations, e.g. to spread the runs of one `--root` over processes.

  python scripts/ablations/run_one.py --pretraining prod --task haze --num-pairs 16 \
      --tuning colora

Takes the flags of the ablation scripts (same `--root`, same sizes) and prints the result row;
a run another process has started is waited for, not repeated.
"""

import json

import _common


def main():
    parser = _common.parser(__doc__.splitlines()[0])
    parser.add_argument("--pretraining", default="prod", choices=_common.PRETRAININGS)
    parser.add_argument("--task", default="haze", choices=_common.TASKS)
    parser.add_argument("--num-pairs", type=int, default=16)
    parser.add_argument("--tuning", default="full", choices=("none", *_common.TUNINGS))
    args = parser.parse_args()
    _common.setup_logging()
    result = _common.finetune(
        args,
        pretraining=args.pretraining,
        task=args.task,
        num_pairs=args.num_pairs,
        tuning=args.tuning,
    )
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
