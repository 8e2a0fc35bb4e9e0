"""Run every benchmark suite for one device: python -m benchmarks.run_all [--device cpu|cuda] [--quick]

Each suite writes its own results/<suite>_<device>.json and .md.
"""
from benchmarks import (bench_conv, bench_distributed, bench_estimators, bench_kl, bench_linear,
                        bench_predictive, bench_small_models, harness)

SUITES = (bench_kl, bench_linear, bench_predictive, bench_estimators, bench_small_models, bench_conv,
          bench_distributed)


def main(argv=None):
    args = harness.parse_args(__doc__, argv)  # validates the flags once; each suite parses them again
    for suite in SUITES:
        print(f"\n===== {suite.__name__} =====", flush=True)
        suite.main(argv)
    print(f"\nall suites done ({args.device})")


if __name__ == "__main__":
    main()
