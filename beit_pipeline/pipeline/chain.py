"""The chain's files: the one place where the name of every file a step reads or writes is spelled.

run_all.sh asks it (``python3 -m beit_pipeline.pipeline.chain shell ...``), and so do workstate.py (the steps'
outputs), the fidelity report (the stages' models), the HTML report, the benchmarks and the tests.  The names
are the guide's where the guide has one (``prep_image_bs8``, ``beit_onnxsim_bs8.onnx``, ``beit_mg_bs8.onnx``,
``ais_out/``, ``acc_bs8.json``); a rename here is a rename everywhere.

    python3 -m beit_pipeline.pipeline.chain shell --workdir W --batch_size 8 --model beit_base_patch16_224
    # prints  prep=W/prep_image_bs8  onnx=W/beit_base_patch16_224.onnx  ...  one shell assignment a line
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

# The steps run_all.sh runs, in order (one of beit_infer / ais_bench, atc only on the Ascend path, demo only without
# images): workstate.step_specs says what each reads and writes, run_all.sh's `step NAME` runs it.
STEPS = ("demo", "preprocess", "pth2onnx", "onnxsim", "graph_modify", "atc", "beit_infer", "ais_bench", "eval",
         "fidelity")

STATE = "run_all_state.json"  # workstate's record: per output, the key it was made with
RUN = ".run_all_run.json"  # workstate's RunParams of the run in progress (the HTML report reads it)
HASH_CACHE = ".run_all_hashes.json"  # workstate's content digests, cached by stat
LOCK = ".run_all.lock"  # run_all.sh's lock of the work folder (flock; the holder's PID inside)
PARTIAL = "_partial"  # a step's output under construction, renamed when the step is complete
# The built-in demo (make_demo_data.py): its folder in the work folder and what it holds.
DEMO = "demo"
DEMO_IMAGES, DEMO_LABELS, DEMO_CHECKPOINT = "images", "val_label.txt", "random_checkpoint.pth"
DEMO_RECORD = "demo.json"  # what made the demo (model, count, seed): a changed recipe remakes it
FIDELITY_DERIVED = ".fidelity_derived.json"  # beit_fidelity.py's record of the graphs it made, every batch size
FUSION_RESULT = "fusion_result.json"  # atc writes it in the folder it runs in
OUTPUTS_ROOT = "ais_out"  # ais_bench's --output: one dated or named folder per run inside


def details_name(json_name: str) -> str:
    """Our figures beside an accuracy JSON: ``acc_bs8.json`` -> ``acc_bs8_details.json`` (any other name:
    NAME + ``_details.json``), whatever name beit_eval_acc.py's --json_file_name gave it."""
    stem = json_name[:-5] if json_name.endswith(".json") else json_name
    return stem + "_details.json"


@dataclasses.dataclass(frozen=True)
class ChainFiles:
    """The files of one run of the chain, relative to the work folder.

    ``tag`` is ``results.result_tag``'s ``_bf16``, ``_cpu``...: a non-default engine or precision writes its own
    outputs and results beside the fp32 ones; the models and the batches are shared.
    """

    batch_size: int
    model: str = ""  # the exported ONNX file's stem: the variant name (beit_base_patch16_224)
    tag: str = ""

    @property
    def prep(self) -> str:
        """beit_preprocess.py's folder: input_NNNNN.bin batches and manifest.json."""
        return f"prep_image_bs{self.batch_size}"

    @property
    def onnx(self) -> str:
        """beit_pth2onnx.py's export, dynamic batch axis: one for every batch size."""
        return f"{self.model}.onnx"

    @property
    def onnxsim(self) -> str:
        return f"beit_onnxsim_bs{self.batch_size}.onnx"

    @property
    def onnxsim_partial(self) -> str:
        """onnxsim writes here; run_all.sh's onnx_check passes it before it is renamed to ``onnxsim``."""
        return f"beit_onnxsim_bs{self.batch_size}.partial.onnx"

    @property
    def graph_modify(self) -> str:
        return f"beit_mg_bs{self.batch_size}.onnx"

    @property
    def om(self) -> str:
        return f"beit_mg_bs{self.batch_size}.om"

    @property
    def om_partial_prefix(self) -> str:
        """atc's ``--output``: it writes PREFIX.om (or PREFIX_linux_<arch>.om, CANN >= 7.0)."""
        return f"beit_mg_bs{self.batch_size}{PARTIAL}"

    @property
    def outputs_dirname(self) -> str:
        """ais_bench's ``--output_dirname``: the folder of this run's outputs inside ``ais_out``."""
        return f"bs{self.batch_size}{self.tag}"

    @property
    def outputs(self) -> str:
        return f"{OUTPUTS_ROOT}/{self.outputs_dirname}"

    @property
    def outputs_partial(self) -> str:
        """Where the inference step writes (ais_bench's --output_dirname), renamed to ``outputs`` when complete."""
        return self.outputs + PARTIAL

    @property
    def fp32_outputs(self) -> str:
        """The default engine's outputs (the OM's on the ascend backend), whatever this run's tag."""
        return dataclasses.replace(self, tag="").outputs

    @property
    def accuracy(self) -> str:
        """The guide's accuracy JSON; our details beside it are results.details_name(accuracy)."""
        return f"acc_bs{self.batch_size}{self.tag}.json"

    def is_accuracy(self, name: str) -> bool:
        """Whether ``name`` is this batch size's accuracy JSON of any engine or precision (``acc_bs8.json``,
        ``acc_bs8_bf16.json``; not ``acc_bs80.json``, not the details beside them)."""
        stem = dataclasses.replace(self, tag="").accuracy[:-len(".json")]
        return (name.endswith(".json") and not name.endswith("_details.json")
                and (name == stem + ".json" or name.startswith(stem + "_")))

    @property
    def accuracy_details(self) -> str:
        return details_name(self.accuracy)

    @property
    def guide_padding(self) -> str:
        """The guide's own graph_modify.py, reproduced by beit_fidelity.py."""
        return f"beit_guide_bs{self.batch_size}.onnx"

    @property
    def om_emulation(self) -> str:
        return f"beit_om_emulation_bs{self.batch_size}.onnx"

    @property
    def guide_om_emulation(self) -> str:
        return f"beit_guide_om_emulation_bs{self.batch_size}.onnx"

    @property
    def fidelity_json(self) -> str:
        return f"fidelity_bs{self.batch_size}.json"

    @property
    def fidelity_md(self) -> str:
        return f"fidelity_bs{self.batch_size}.md"

    @property
    def fidelity_logits(self) -> str:
        """beit_fidelity.py's kept logits, one folder per stage, so a rerun goes on where it stopped."""
        return f"fidelity_logits_bs{self.batch_size}"

    def locate(self, stage: str) -> str:
        """beit_fidelity.py --locate STAGE's record, for the HTML report."""
        return f"locate_{stage}_bs{self.batch_size}.json"

    @property
    def keep_dtype_cfg(self) -> str:
        """beit_fidelity.py --suggest_keep_dtype's list in atc's format."""
        return f"keep_dtype_bs{self.batch_size}.cfg"

    @property
    def keep_dtype_json(self) -> str:
        return f"keep_dtype_bs{self.batch_size}.json"

    @property
    def report_html(self) -> str:
        return f"report_bs{self.batch_size}.html"

    def in_workdir(self, workdir: str) -> dict[str, str]:
        """The files run_all.sh names: {shell variable: absolute path}, and two names (ais_bench's --output_dirname
        of the partial folder, beit_eval_acc.py's --json_file_name)."""
        names = {"lock_file": LOCK, "demo_dir": DEMO, "demo_images": f"{DEMO}/{DEMO_IMAGES}",
                 "demo_labels": f"{DEMO}/{DEMO_LABELS}", "demo_checkpoint": f"{DEMO}/{DEMO_CHECKPOINT}",
                 "prep": self.prep, "onnx": self.onnx, "sim": self.onnxsim, "sim_partial": self.onnxsim_partial,
                 "mg": self.graph_modify, "om": self.om, "om_partial": self.om_partial_prefix,
                 "outputs_root": OUTPUTS_ROOT, "outputs": self.outputs}
        return {var: os.path.join(workdir, name) for var, name in names.items()} | {
            "outputs_partial_dirname": self.outputs_dirname + PARTIAL, "accuracy_name": self.accuracy}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m beit_pipeline.pipeline.chain",
                                     description="Print the chain's file names for run_all.sh.")
    sub = parser.add_subparsers(dest="command", required=True)
    shell = sub.add_parser("shell", help="one shell assignment a line (var=quoted path), for eval")
    shell.add_argument("--workdir", required=True, help="the work folder the paths are in")
    shell.add_argument("--batch_size", type=int, required=True, help="the run's batch size")
    shell.add_argument("--model", default="", help="the exported ONNX file's stem (the variant name; not known "
                                                   "before workstate's begin, when only the lock and demo are asked)")
    shell.add_argument("--tag", default="", help="a non-default engine or precision's tag (_bf16, ...)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chain = ChainFiles(args.batch_size, args.model, args.tag)
    for var, path in chain.in_workdir(args.workdir).items():
        print(f"{var}={shlex.quote(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
