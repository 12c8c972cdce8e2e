"""The fidelity report's benchmark: its wall time against one inference pass, the brute force beside it,
and the projection to 50,000 images (issue 19).  See beit_pipeline/bench/fidelity.py for what it does.

    python3 beit_fidelity_bench.py --out bench_fidelity            # BEiT-base, 504 images: ~1 hour on 2 cores
    python3 beit_fidelity_bench.py --out /tmp/b --model beit_tiny_test_patch16_224 --images 48   # a smoke run

Exit status: 0 done; 1 a step failed (its last lines are shown); 2 usage.
"""

import argparse
import sys

from beit_pipeline import cli
from beit_pipeline.bench import fidelity as fidelity_bench
from beit_pipeline.cli import log
from beit_pipeline.errors import PipelineError


def build_parser():
    p = argparse.ArgumentParser(description="Time the default fidelity report against one inference pass of the "
                                            "same images, beside the brute force, and project it to 50,000 images.")
    p.add_argument("--out", required=True, help="folder for the images, the work folder and results.json/.md")
    p.add_argument("--images", type=int, default=504,
                   help="real-photograph variants to make (default %(default)s: 63 batches of 8; at least 500 "
                        "for the issue's figures)")
    p.add_argument("--model", default="beit_base_patch16_224",
                   help="the BEiT variant, random weights (default %(default)s; beit_tiny_test_patch16_224 for a "
                        "smoke run)")
    p.add_argument("--batch_size", type=int, default=8, help="batch size (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, weights and the report (default 0)")
    p.add_argument("--project", type=int, default=50000,
                   help="the image count to project the report's cost to (default %(default)s: ImageNet val)")
    p.add_argument("--skip_brute", action="store_true",
                   help="leave out the brute-force report (about one pass per stage: the longest part)")
    return p


def check_args(args):
    cli.check(args.images >= 1 and args.batch_size >= 1 and args.project >= 1,
              "--images, --batch_size and --project must be at least 1")


def run(args):
    try:
        results = fidelity_bench.run(args)
    except RuntimeError as exc:
        raise PipelineError(str(exc)) from exc
    log.info(fidelity_bench.markdown(results))


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
