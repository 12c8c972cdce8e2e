#!/usr/bin/env bash
# run_all.sh: the guide's chain of commands, end to end, in one work folder.
#   [make_demo_data.py] -> beit_preprocess.py -> beit_pth2onnx.py -> onnxsim (+ onnx_check.py)
#   -> graph_modify.py -> atc + ais_bench (Ascend 310P) | beit_infer.py (ONNX Runtime) -> beit_eval_acc.py
#
# Which step is complete for which inputs is Python's business (beit_pipeline/pipeline/workstate.py): this script
# asks it before each step whether to run, and says when a step is done.  Uses `python3` from PATH.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
export PYTHONPATH="${SCRIPT_DIR}${PYTHONPATH:+:${PYTHONPATH}}" # python3 -m beit_pipeline.* from any folder
# Exit codes are beit_pipeline/errors.py's (README "Exit codes"), read from there; no python3, or one that cannot
# import the package, are the two refusals made before they can be read (exit 2, usage, as README says).
command -v python3 >/dev/null || { printf 'error: python3 is not on PATH (make demo puts .venv/bin first)\n' >&2 && exit 2; }
EXIT_CODES="$(python3 -c 'from beit_pipeline.errors import shell_assignments; print(shell_assignments())' 2>&1)" ||
  { printf 'error: python3 cannot read the exit codes from beit_pipeline/errors.py: %s\n' "${EXIT_CODES##*$'\n'}" >&2 && exit 2; }
eval "${EXIT_CODES}"

# Options, named after their flags (parse_args sets --image_path in IMAGE_PATH).
BATCH_SIZE="" IMAGE_PATH="" LABEL_FILE="" CHECKPOINT="" WORKDIR="./work" BACKEND="auto"
SOC_VERSION="" DEVICE="0" MODEL="" FORCE=0 SKIP_BAD=0 WAIT_LOCK=0 NO_FIDELITY=0 PRECISION="fp32" PROVIDERS="" KEEP_DTYPE=""
MODEL_FILE="" SIZE=224 SIMPLIFIER=onnxsim TAG=""
STEP_PID="" STEP_NAME="" STATE_STEP="" FAILED_TOOL=""

usage() {
  cat <<'EOF'
Usage: bash run_all.sh --batch_size N [options]

Runs the BEiT offline-inference pipeline end to end; prints Top-1/Top-5 and throughput.  Without
--image_path, --label_file and --checkpoint: the built-in demo (a random BEiT, real photographs
labelled with PyTorch's own predictions: 100% measures fidelity to PyTorch, not ImageNet accuracy).

Options:
  --batch_size N        batch size of the model and the batch files (required)
  --image_path DIR      folder of ImageNet val images (e.g. /opt/npu/imageNet/val)
  --label_file FILE     val_label.txt ('ILSVRC2012_val_00000001.JPEG 65' lines), LOC_val_solution.csv,
                        ILSVRC2012_validation_ground_truth.txt or a synset mapping (README, "Your files");
                        default: the class sub-folders of --image_path (all 1000 synsets)
  --checkpoint PTH      BEiT checkpoint: unilm's (beit_base_patch16_224_pt22k_ft22kto1k.pth), DDP, EMA,
                        Hugging Face's pytorch_model.bin / model.safetensors (README, "Your files")
  --workdir DIR         where every step writes its output (default: ./work)
  --backend B           auto | ascend | ort | cpu (auto: ascend when atc and ais_bench are found; a
                        host with atc whose ais_bench or AIS_INFER does not work is refused, not
                        run on the CPU; ort = cpu: beit_infer.py on the CPU, the fastest exact
                        engine found: README)
  --precision P         fp32 | bf16 | fp16: beit_infer.py's precision (ort; default fp32; bf16 and fp16
                        need the CPU's instructions for them, checked before the first step). Its
                        outputs and results get their own names (ais_out/bs8_bf16, acc_bs8_bf16.json)
                        and the Top-1 cost against the fp32 result is printed when both exist
  --providers LIST      beit_infer.py's --providers (ort): openvino, or cpu,cuda,... of ONNX Runtime
                        (default: the fastest exact CPU engine); results named like --precision's
  --soc_version NAME    atc --soc_version (default: Ascend + the chip name `npu-smi info` shows)
  --device ID           NPU device id for ais_bench (default: 0)
  --model NAME          BEiT variant, also the ONNX file's name (default: read from the checkpoint);
                        base/large at 224, 384 and 512 px: the steps take its input size
  --skip_bad            leave out images that cannot be decoded (counted in the summary)
  --keep_dtype FILE     atc's keep_dtype file (one node name of beit_mg_bs{N}.onnx or OpType::TypeName
                        per line; beit_fidelity.py --suggest_keep_dtype writes one): passed to atc with
                        --precision_mode=force_fp16, and to the fidelity step's emulated OM
  --force               redo every step; deletes only the files a recorded run made
  --wait_lock           wait while another run_all.sh uses the work folder (default: refuse)
  --no_fidelity         skip the last step, beit_fidelity.py (every stage scored, the OM's fp16 emulated)
  -h, --help            show this help and exit

A step is redone exactly when what it depends on changed: README, "When things go wrong".  Work folder:
prep_image_bs{N}/, <model>.onnx, beit_onnxsim_bs{N}.onnx, beit_mg_bs{N}.onnx, beit_mg_bs{N}.om (Ascend),
ais_out/bs{N}/, acc_bs{N}.json (the guide's) and acc_bs{N}_details.json (what the numbers are and were
made from), report_bs{N}.html (the HTML report), run_all_state.json (what made them).  The number of classes
is read from the model.
EOF
}

log() { printf '[run_all] %s\n' "$*"; }

die() { printf 'error: %s\n' "$*" >&2 && exit "${EXIT_USAGE}"; }

parse_args() {
  local opt val
  while (($# > 0)); do
    opt="${1%%=*}" val="${1#*=}"
    case "${opt}" in
      -h | --help) usage && exit "${EXIT_OK}" ;;
      --force | --skip_bad | --wait_lock | --no_fidelity) [[ "$1" == "${opt}" ]] || die "${opt} takes no value" && val=1 ;;
      --batch_size | --batchsize | --image_path | --label_file | --checkpoint | --workdir | --backend | \
        --soc_version | --device | --model | --precision | --providers | --keep_dtype)
        if [[ "$1" == "${opt}" ]]; then
          (($# >= 2)) || die "${opt} needs a value (see --help)"
          val="$2" && shift
        fi ;;
      --*) die "unknown option '${opt}' (see --help)" ;;
      *) die "unexpected argument '${opt}' (see --help)" ;;
    esac
    opt="${opt#--}" && opt="${opt^^}"
    printf -v "${opt/#BATCHSIZE/BATCH_SIZE}" '%s' "${val}"
    shift
  done
  [[ -n "${BATCH_SIZE}" ]] || die "--batch_size is required (see --help)"
  [[ "${BATCH_SIZE}" =~ ^[1-9][0-9]*$ ]] || die "--batch_size must be a positive integer, got '${BATCH_SIZE}'"
  [[ "${DEVICE}" =~ ^[0-9]+$ ]] || die "--device must be a non-negative integer, got '${DEVICE}'"
  [[ "${BACKEND}" =~ ^(auto|ascend|ort|cpu)$ ]] || die "--backend must be auto, ascend, ort or cpu, got '${BACKEND}'"
  if [[ "${BACKEND}" == cpu ]]; then BACKEND=ort; fi
  [[ "${PRECISION}" =~ ^(fp32|bf16|fp16|int8)$ ]] || die "--precision must be fp32, bf16 or fp16, got '${PRECISION}'"
  [[ -n "${WORKDIR}" ]] || die "--workdir must not be empty"
  if [[ -n "${IMAGE_PATH}${LABEL_FILE}${CHECKPOINT}" ]]; then
    [[ -n "${IMAGE_PATH}" && -n "${CHECKPOINT}" ]] ||
      die "give --image_path and --checkpoint (and --label_file unless the images are in class sub-folders), or none of them for the built-in demo"
    [[ -d "${IMAGE_PATH}" ]] || die "--image_path ${IMAGE_PATH}: not a folder"
    LABEL_FILE="${LABEL_FILE:-${IMAGE_PATH}}" # issue 21: no label file: the class sub-folders are the labels
    [[ -e "${LABEL_FILE}" ]] || die "--label_file ${LABEL_FILE}: file not found"
    [[ -e "${CHECKPOINT}" ]] || die "--checkpoint ${CHECKPOINT}: file not found"
    IMAGE_PATH="$(realpath -- "${IMAGE_PATH}")" LABEL_FILE="$(realpath -- "${LABEL_FILE}")"
    CHECKPOINT="$(realpath -- "${CHECKPOINT}")"
  fi
  if [[ -n "${KEEP_DTYPE}" ]]; then
    [[ -f "${KEEP_DTYPE}" ]] || die "--keep_dtype ${KEEP_DTYPE}: file not found"
    KEEP_DTYPE="$(realpath -- "${KEEP_DTYPE}")"
  fi
  # Absolute paths: the steps run in the work folder, and no path may look like an option.
  WORKDIR="$(realpath -m -- "${WORKDIR}")"
  [[ -z "${AIS_INFER:-}" ]] || AIS_INFER="$(realpath -m -- "${AIS_INFER}")"
}

# The package next to this script: run_all.sh's record (workstate) and its questions about CANN (ascend).
pkg() { python3 -m "beit_pipeline.$1" "${@:2}"; }
state() { pkg pipeline.workstate --workdir "${WORKDIR}" "$@"; }

choose_backend() { # ascend needs atc, aclruntime and an ais_bench (or AIS_INFER) with --output_dirname
  local atc_path why=""
  atc_path="$(command -v atc || true)"
  [[ -n "${atc_path}" ]] || why="'atc' is not on PATH (no CANN toolkit here)"
  [[ -n "${why}" ]] || why="$(pkg inference.ascend check-ais-bench 2>&1)" || why="atc is at ${atc_path}, but ${why#error: }"
  case "${BACKEND}:${why}" in
    ascend:?*) die "--backend ascend: ${why} (source the CANN set_env.sh)" ;;
    ascend:) log "backend: ascend (asked for; atc: ${atc_path})" ;;
    ort:*) log "backend: ort (beit_infer.py on the CPU; asked for)" ;;
    auto:atc\ is\ at*) die "${why}: fix it (source the CANN set_env.sh), or pass --backend cpu to run on the CPU" \
      "(hours for ImageNet's 50,000 images)" ;;
    auto:?*) BACKEND="ort" && log "backend: ort (beit_infer.py on the CPU), because ${why}" ;;
    auto:) BACKEND="ascend" && log "backend: ascend, because atc is at ${atc_path} and ais_bench is available" ;;
  esac
}

# One run_all.sh per work folder.  The kernel drops the lock when its holder dies; the steps inherit
# it, so a step orphaned by a killed run_all.sh still keeps a second run out.
lock_workdir() {
  local lock="${lock_file}" holder
  exec {LOCK_FD}<>"${lock}"
  if ! flock -n "${LOCK_FD}"; then
    exec {LOCK_FD}>&- # so that the question below does not find this run among the holders
    holder="$(state lock-holder "${lock}" 2>/dev/null || true)"
    ((WAIT_LOCK)) || { printf 'error: %s is in use by %s (another run_all.sh or a step it started); wait for it, or pass --wait_lock\n' \
      "${WORKDIR}" "${holder:-another process}" >&2 && exit "${EXIT_BUSY}"; }
    log "waiting for ${holder:-another process}, which is using ${WORKDIR}"
    exec {LOCK_FD}<>"${lock}"
    flock "${LOCK_FD}"
  fi
  # The PID is for the message of a second run; a full disk must not stop this one here (the lock holds).
  { printf '%s\n' "$$" >"${lock}"; } 2>/dev/null || true
}

# INT/TERM: stop the running step (its whole process group) and say which step it was.
on_signal() {
  local signal="$1" code="$2"
  trap - INT TERM
  if [[ -n "${STEP_PID}" ]]; then
    kill -s "${signal}" -- "-${STEP_PID}" 2>/dev/null || kill -s "${signal}" "${STEP_PID}" 2>/dev/null || true
    wait "${STEP_PID}" 2>/dev/null || true
  fi
  printf 'error: %s: stopped %s; run the same command again to go on from there\n' "${signal}" \
    "${STEP_NAME:+step }${STEP_NAME:-between steps}" >&2
  if [[ -n "${STATE_STEP}" ]]; then state fail "${STATE_STEP}" --interrupted || true; fi
  exit "${code}"
}

# run_step NAME CMD...: log the command, run it in the work folder in its own process group (so that
# a signal reaches all of it), log its time; return its exit code when it fails (FAILED_TOOL: NAME).
run_step() {
  local name="$1" start="${SECONDS}" rc=0
  shift
  printf '[run_all] step %s:%s\n' "${name}" "$(printf ' %q' "$@")"
  (cd "${WORKDIR}" && exec setsid "$@") &
  STEP_PID=$! STEP_NAME="${name}"
  wait "${STEP_PID}" || rc=$?
  STEP_PID="" STEP_NAME=""
  if ((rc != 0)); then FAILED_TOOL="${name}" && return "${rc}"; fi
  log "step ${name} done in $((SECONDS - start)) s"
}

# step NAME CMD...: CMD runs (through run_step or a function that calls it) unless the state module
# says NAME is complete for these inputs; then its outputs are checked and recorded (finish).  When
# CMD fails, the state module removes what it left and the results that depended on it, and says so.
step() {
  local name="$1" rc=0
  shift
  state start "${name}" || rc=$?
  ((rc == EXIT_SKIP)) && return 0
  ((rc == 0)) || exit "${rc}"
  STATE_STEP="${name}"
  "$@" || rc=$?
  if ((rc != 0)); then
    state fail "${name}" --exit_code "${rc}" --tool "${FAILED_TOOL:-${name}}" || true
    exit "${EXIT_FAILED}"
  fi
  STATE_STEP=""
  state finish "${name}"
}

onnxsim_and_check() {
  local onnx="$1" partial="$2"
  # beit_pipeline.progress: a heartbeat line while onnxsim works silently (issue 21)
  run_step onnxsim python3 -m beit_pipeline.progress --label onnxsim -- \
    python3 -m "${SIMPLIFIER}" "${onnx}" "${partial}" --overwrite-input-shape "${BATCH_SIZE},3,${SIZE},${SIZE}" ||
    return
  run_step onnx_check python3 "${SCRIPT_DIR}/onnx_check.py" "${onnx}" "${partial}" --batch_size "${BATCH_SIZE}"
}

# The number of classes is the model's (a 10-class checkpoint's outputs are 10 wide), never asked for.
run_eval() {
  local classes
  classes="$(state num-classes)" || return
  run_step eval python3 "${SCRIPT_DIR}/beit_eval_acc.py" "$@" --num_classes "${classes}"
}

run_demo_step() {
  local args=(--out "${demo_dir}")
  log "demo: a random BEiT on real photographs labelled with its own PyTorch predictions: Top-1 measures"
  log "demo: fidelity to PyTorch (100% expected), not ImageNet accuracy"
  IMAGE_PATH="${demo_images}" LABEL_FILE="${demo_labels}" CHECKPOINT="${demo_checkpoint}"
  if [[ -n "${MODEL}" ]]; then args+=(--model "${MODEL}"); fi
  step demo run_step demo python3 "${SCRIPT_DIR}/make_demo_data.py" "${args[@]}"
}

run_pipeline() {
  local n="${BATCH_SIZE}" w="${WORKDIR}" prep_args=() export_args=() infer=() model atc_keep=() fidelity_keep=()
  local names prep onnx sim sim_partial mg om om_partial outputs_root outputs outputs_partial_dirname accuracy_name
  # The chain's file names are spelled once, in beit_pipeline/pipeline/chain.py: one `var=quoted path` a line.
  names="$(pkg pipeline.chain shell --workdir "${w}" --batch_size "${n}" --model "${MODEL_FILE}" --tag "${TAG}")"
  eval "${names}"
  if ((SKIP_BAD)); then prep_args+=(--skip_bad); fi
  if [[ -n "${MODEL}" ]]; then export_args+=(--model "${MODEL}"); fi
  if [[ -n "${KEEP_DTYPE}" ]]; then
    atc_keep=(--keep_dtype="${KEEP_DTYPE}" --precision_mode=force_fp16)
    fidelity_keep=(--keep_dtype "${KEEP_DTYPE}")
  fi
  step preprocess run_step preprocess python3 "${SCRIPT_DIR}/beit_preprocess.py" --image_path "${IMAGE_PATH}" \
    --prep_image "${prep}" --batch_size "${n}" --image_size "${SIZE}" "${prep_args[@]}"
  # The ONNX file has a dynamic batch axis shared by every batch size; tracing at 1 is fastest.
  step pth2onnx run_step pth2onnx python3 "${SCRIPT_DIR}/beit_pth2onnx.py" --source "${CHECKPOINT}" \
    --target "${onnx}" --batch_size 1 "${export_args[@]}"
  step onnxsim onnxsim_and_check "${onnx}" "${sim_partial}"
  step graph_modify run_step graph_modify python3 "${SCRIPT_DIR}/graph_modify.py" "${sim}" "${mg}" "${n}"
  mkdir -p -- "${outputs_root}"
  if [[ "${BACKEND}" == ascend ]]; then
    step atc run_step atc atc --framework=5 --model="${mg}" --output="${om_partial}" --input_format=NCHW \
      --input_shape="image:${n},3,${SIZE},${SIZE}" --log=error --soc_version="${SOC_VERSION}" \
      --optypelist_for_implmode="Gelu" --op_select_implmode=high_performance "${atc_keep[@]}"
    infer=(ais_bench python3 -m ais_bench --model "${om}" --device "${DEVICE}")
    if [[ -n "${AIS_INFER:-}" ]]; then infer=(ais_bench python3 "${AIS_INFER}" "${infer[@]:4}"); fi
    model="${om}"
  else
    infer=(beit_infer python3 "${SCRIPT_DIR}/beit_infer.py" --model "${mg}" --precision "${PRECISION}")
    if [[ -n "${PROVIDERS}" ]]; then infer+=(--providers "${PROVIDERS}"); fi
    model="${mg}"
  fi
  step "${infer[0]}" run_step "${infer[@]}" --input "${prep}" --output "${outputs_root}" \
    --output_dirname "${outputs_partial_dirname}" --outfmt TXT --batchsize "${n}"
  step eval run_eval --folder_davinci_target "${outputs}" \
    --annotation_file_path "${LABEL_FILE}" --result_json_path "${w}" --json_file_name "${accuracy_name}" \
    --batch_size "${n}" --prep_image "${prep}" --checkpoint "${CHECKPOINT}" --model_file "${model}"
  ((NO_FIDELITY)) || step fidelity run_step fidelity python3 "${SCRIPT_DIR}/beit_fidelity.py" --workdir "${w}" \
    --batch_size "${n}" --checkpoint "${CHECKPOINT}" --label_file "${LABEL_FILE}" --model "${MODEL_FILE}" \
    "${fidelity_keep[@]}"
}

# Every refusal that can be made before the first step (exit 2): the Python, the model, the backend,
# the engine and precision, the work folder.
preflight() {
  local engine
  pkg environment
  if [[ -n "${MODEL}" ]]; then state check-model "${MODEL}"; fi
  choose_backend
  if [[ -n "${LABEL_FILE}" ]]; then pkg evaluation.labels "${LABEL_FILE}"; fi # issue 21: the label form, or refused
  if [[ "${BACKEND}" == ascend ]]; then
    [[ "${PRECISION}" == fp32 && -z "${PROVIDERS}" ]] ||
      die "--precision and --providers are beit_infer.py's (--backend cpu); atc sets the OM's precision"
  elif [[ "${PRECISION}" != fp32 || -n "${PROVIDERS}" ]]; then # (fp32 by default always runs: no question)
    engine="$(state check-engine --precision "${PRECISION}" --providers "${PROVIDERS}")"
    log "engine: ${engine}"
  fi
  state check-workdir
}

main() {
  local start="${SECONDS}" flags=() info names lock_file demo_dir demo_images demo_labels demo_checkpoint
  parse_args "$@"
  export PYTHONUNBUFFERED=1 # the steps' stdout stays in order with their stderr when piped
  preflight
  # The lock's and the demo's paths (the chain's file names are spelled once, in beit_pipeline/pipeline/chain.py).
  names="$(pkg pipeline.chain shell --workdir "${WORKDIR}" --batch_size "${BATCH_SIZE}")"
  eval "${names}"
  lock_workdir
  trap 'on_signal INT "${EXIT_INTERRUPTED}"' INT
  trap 'on_signal TERM "${EXIT_TERMINATED}"' TERM
  log "work folder: ${WORKDIR}"
  if [[ "${BACKEND}" == ascend ]]; then pkg inference.ascend check-paths "${WORKDIR}"; fi
  [[ "${BACKEND}" != ascend || -n "${SOC_VERSION}" ]] || SOC_VERSION="$(pkg inference.ascend soc-version)"
  flags=(--batch_size "${BATCH_SIZE}" --backend "${BACKEND}" --image_path "${IMAGE_PATH}" --label_file "${LABEL_FILE}"
    --checkpoint "${CHECKPOINT}" --soc_version "${SOC_VERSION}" --model "${MODEL}" --precision "${PRECISION}"
    --providers "${PROVIDERS}" --keep_dtype "${KEEP_DTYPE}")
  if ((SKIP_BAD)); then flags+=(--skip_bad); fi
  if ((FORCE)); then flags+=(--force); fi
  if ((NO_FIDELITY)); then flags+=(--no_fidelity); fi
  state begin "${flags[@]}"
  info="$(state model-info)" && read -r MODEL_FILE SIZE SIMPLIFIER TAG <<<"${info}"
  if [[ -z "${IMAGE_PATH}" ]]; then run_demo_step; fi
  run_pipeline
  state summary
  # issue 21: the self-contained HTML report of what this folder holds (not a step: rewritten every run)
  if ! python3 "${SCRIPT_DIR}/beit_report.py" --workdir "${WORKDIR}" --batch_size "${BATCH_SIZE}"; then
    log "warning: the HTML report was not written (see above); the results above stand"
  fi
  log "total time $((SECONDS - start)) s"
}

# Sourcing the file (for tests of its functions) defines them without running the pipeline.
if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  main "$@"
fi
