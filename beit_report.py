"""Write the run's HTML report (ours; run_all.sh runs it last and prints its path).

    python3 beit_report.py --workdir work --batch_size 8

One self-contained file, ``WORKDIR/report_bs{N}.html`` (no network: plots and thumbnails inline): the
accuracy with what it was computed on, the fidelity table with intervals and a verdict per stage, the
error after each block (beit_fidelity.py --locate), the flipped images with both top-5 lists, throughput
per engine and precision, and atc's keep_dtype suggestion.  It reads whatever of these the work folder
holds and says what is missing.  The work is in beit_pipeline/report/html.py and data.py.
"""

import argparse
import os
import sys

from beit_pipeline import cli
from beit_pipeline.cli import log


def build_parser():
    parser = argparse.ArgumentParser(description="Write the run's self-contained HTML report (report_bs{N}.html).")
    parser.add_argument("--workdir", required=True, help="run_all.sh's work folder")
    parser.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, required=True,
                        help="the batch size of the run (acc_bs{N}.json, fidelity_bs{N}.json, ...)")
    parser.add_argument("--output", default=None,
                        help="the HTML file to write (default: WORKDIR/report_bs{N}.html)")
    return parser


def check_args(args):
    cli.check(args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}")
    cli.check(os.path.isdir(args.workdir), f"--workdir {args.workdir}: not a folder")


def run(args):
    from beit_pipeline.report import html as report_html

    path = report_html.write_report(args.workdir, args.batch_size, args.output)
    log.info(f"report: {path}")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
