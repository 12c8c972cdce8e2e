#!/usr/bin/env bash
#
# run_all.sh: the whole BEiT offline-inference pipeline of the guide, in one command.
#
#   [make_demo_data.py] -> beit_preprocess.py -> beit_pth2onnx.py -> onnxsim (+ onnx_check.py)
#   -> graph_modify.py -> atc + ais_bench (Ascend 310P) | beit_infer.py (ONNX Runtime)
#   -> beit_eval_acc.py
#
# Every step writes into the work folder under the guide's file names and is skipped
# when its output is already there and complete (unless --force or an earlier step
# that it depends on ran again).  Without --image_path/--label_file/--checkpoint it
# runs the built-in demo (random BEiT, synthetic images, labels = PyTorch's own
# predictions).  Uses `python3` from PATH; the scripts are found next to this file.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly DEFAULT_MODEL="beit_base_patch16_224"
readonly INPUTS_RECORD="run_all_inputs.txt"

# Options (set by parse_args).
BATCH_SIZE=""
IMAGE_PATH=""
LABEL_FILE=""
CHECKPOINT=""
WORKDIR="./work"
BACKEND="auto"
SOC_VERSION=""
DEVICE="0"
FORCE=0
MODEL=""
DEMO=0

# Which steps ran in this invocation: a step whose inputs were remade is remade too.
declare -A RAN=()
# When set, run_step also appends the step's stdout to this file.
STEP_LOG=""

usage() {
  cat <<'EOF'
Usage: bash run_all.sh --batch_size N [options]

Runs the BEiT offline-inference pipeline end to end and prints Top-1/Top-5 and
throughput.  Without --image_path, --label_file and --checkpoint it runs the
built-in demo: a randomly initialised BEiT and synthetic images labelled with
PyTorch's own predictions, so its accuracy measures fidelity to PyTorch (100%
expected), not ImageNet accuracy.

Options:
  --batch_size N        batch size of the model and the batch files (required)
  --image_path DIR      folder of ImageNet val images (e.g. /opt/npu/imageNet/val)
  --label_file FILE     val_label.txt: lines 'ILSVRC2012_val_00000001.JPEG 65'
  --checkpoint PTH      unilm BEiT checkpoint (beit_base_patch16_224_pt22k_ft22kto1k.pth)
  --workdir DIR         where every step writes its output (default: ./work)
  --backend B           auto | ascend | ort (default: auto: ascend when `atc` and
                        ais_bench are available, else ONNX Runtime)
  --soc_version NAME    atc --soc_version (default: Ascend + the chip name that
                        `npu-smi info` shows, e.g. Ascend310P3)
  --device ID           NPU device id for ais_bench (default: 0)
  --model NAME          BEiT variant of the checkpoint; must take 224x224 images
                        (preprocessing, onnxsim and atc are fixed at 224), e.g.
                        beit_base_patch16_224 or beit_large_patch16_224.  Also
                        names the ONNX file <NAME>.onnx.  Default: the variant is
                        read from the checkpoint, but the ONNX file is always
                        named beit_base_patch16_224.onnx, even for a large one
  --force               redo every step even when its output exists; when the
                        inputs differ from those the work folder was made from,
                        first delete every output made from the old ones
  -h, --help            show this help and exit

Work folder: prep_image_bs{N}/, <model>.onnx, beit_onnxsim_bs{N}.onnx,
beit_mg_bs{N}.onnx, beit_mg_bs{N}.om (Ascend), ais_out/bs{N}/, acc_bs{N}.json.
EOF
}

log() {
  printf '[run_all] %s\n' "$*"
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# An absolute path, so that no path reaches a script looking like an option and
# the steps may run with the work folder as their current directory.
abspath() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "${PWD}" "${1#./}" ;;
  esac
}

parse_args() {
  local opt val
  while (($# > 0)); do
    opt="$1"
    val=""
    case "${opt}" in
      -h | --help)
        usage
        exit 0
        ;;
      --force)
        FORCE=1
        shift
        continue
        ;;
      --*=*)
        val="${opt#*=}"
        opt="${opt%%=*}"
        shift
        ;;
      --batch_size | --batchsize | --image_path | --label_file | --checkpoint | --workdir | --backend | \
        --soc_version | --device | --model)
        (($# >= 2)) || die "${opt} needs a value (see --help)"
        val="$2"
        shift 2
        ;;
      --*)
        die "unknown option '${opt}' (see --help)"
        ;;
      *)
        die "unexpected argument '${opt}' (see --help)"
        ;;
    esac
    case "${opt}" in
      --batch_size | --batchsize) BATCH_SIZE="${val}" ;;
      --image_path) IMAGE_PATH="${val}" ;;
      --label_file) LABEL_FILE="${val}" ;;
      --checkpoint) CHECKPOINT="${val}" ;;
      --workdir) WORKDIR="${val}" ;;
      --backend) BACKEND="${val}" ;;
      --soc_version) SOC_VERSION="${val}" ;;
      --device) DEVICE="${val}" ;;
      --model) MODEL="${val}" ;;
      *) die "unknown option '${opt}' (see --help)" ;;
    esac
  done

  [[ -n "${BATCH_SIZE}" ]] || die "--batch_size is required (see --help)"
  [[ "${BATCH_SIZE}" =~ ^[1-9][0-9]*$ ]] || die "--batch_size must be a positive integer, got '${BATCH_SIZE}'"
  [[ "${DEVICE}" =~ ^[0-9]+$ ]] || die "--device must be a non-negative integer, got '${DEVICE}'"
  case "${BACKEND}" in
    auto | ascend | ort) ;;
    *) die "--backend must be auto, ascend or ort, got '${BACKEND}'" ;;
  esac
  [[ -n "${WORKDIR}" ]] || die "--workdir must not be empty"

  if [[ -z "${IMAGE_PATH}${LABEL_FILE}${CHECKPOINT}" ]]; then
    DEMO=1
  elif [[ -z "${IMAGE_PATH}" || -z "${LABEL_FILE}" || -z "${CHECKPOINT}" ]]; then
    die "give --image_path, --label_file and --checkpoint together, or none of them for the built-in demo"
  else
    [[ -d "${IMAGE_PATH}" ]] || die "--image_path ${IMAGE_PATH}: not a folder"
    [[ -f "${LABEL_FILE}" ]] || die "--label_file ${LABEL_FILE}: file not found"
    [[ -f "${CHECKPOINT}" ]] || die "--checkpoint ${CHECKPOINT}: file not found"
    IMAGE_PATH="$(abspath "${IMAGE_PATH}")"
    LABEL_FILE="$(abspath "${LABEL_FILE}")"
    CHECKPOINT="$(abspath "${CHECKPOINT}")"
  fi
  WORKDIR="$(abspath "${WORKDIR}")"
}

# Microseconds since the epoch, for step timings (EPOCHREALTIME needs bash 5; CANN hosts may have 4).
now_us() {
  local t="${EPOCHREALTIME:-}"
  if [[ -n "${t}" ]]; then
    printf '%s' "${t//[.,]/}"
  else
    printf '%s000000' "$(date +%s)"
  fi
}

# seconds_since START_US: elapsed time as "12.3".
seconds_since() {
  local elapsed=$(($(now_us) - $1))
  printf '%d.%d' "$((elapsed / 1000000))" "$((elapsed % 1000000 / 100000))"
}

# run_step NAME CMD...: log the command, run it (cwd: the work folder), log its time;
# stop the whole run naming the step when it fails.
run_step() {
  local name="$1"
  shift
  local start rc=0 arg
  printf '[run_all] step %s:' "${name}"
  for arg in "$@"; do
    # Shell-quoted only where needed, so that the line can be pasted back into a shell.
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      printf ' %s' "${arg}"
    else
      printf ' %q' "${arg}"
    fi
  done
  printf '\n'
  start="$(now_us)"
  if [[ -n "${STEP_LOG}" ]]; then
    (cd "${WORKDIR}" && "$@" | tee -a "${STEP_LOG}") || rc=$?
  else
    (cd "${WORKDIR}" && "$@") || rc=$?
  fi
  if ((rc != 0)); then
    printf "error: step '%s' failed (exit %d); see above\n" "${name}" "${rc}" >&2
    exit 1
  fi
  printf '[run_all] step %s done in %s s\n' "${name}" "$(seconds_since "${start}")"
  RAN["${name}"]=1
}

# should_run NAME OUTPUT_OK WHAT DEPS...: 0 (run) unless OUTPUT_OK is 1, there is no
# --force and no step in DEPS ran in this invocation; says "skip" otherwise.  WHAT
# is the output named in the log line.
should_run() {
  local name="$1" ok="$2" what="$3"
  shift 3
  local dep
  if ((FORCE)) || [[ "${ok}" != 1 ]]; then
    return 0
  fi
  for dep in "$@"; do
    if [[ -n "${RAN[${dep}]:-}" ]]; then
      log "redo ${name}: ${what} exists, but step ${dep} ran again"
      return 0
    fi
  done
  log "skip ${name}: ${what} is complete (use --force to redo)"
  return 1
}

# py_json_field FILE KEY: print a JSON file's top-level KEY; fails quietly.
py_json_field() {
  python3 -c 'import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    v = json.load(f)[sys.argv[2]]
print(v)' "$1" "$2" 2>/dev/null
}

# manifest_complete DIR: 0 when DIR/manifest.json says complete=true for this batch size.
manifest_complete() {
  python3 -c 'import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    m = json.load(f)
sys.exit(0 if m.get("complete") is True and m.get("batch_size") == int(sys.argv[2]) else 1)' \
    "$1/manifest.json" "${BATCH_SIZE}" 2>/dev/null
}

# 0 when OUT_DIR holds an ais_bench output for every batch file of PREP_DIR.
outputs_complete() {
  local prep="$1" out="$2" batch stem found=0
  [[ -d "${out}" ]] || return 1
  for batch in "${prep}"/input_*.bin; do
    [[ -e "${batch}" ]] || return 1
    stem="${batch##*/}"
    stem="${stem%.bin}"
    if [[ ! -f "${out}/${stem}_0.txt" && ! -f "${out}/${stem}_0.bin" && ! -f "${out}/${stem}_0.npy" ]]; then
      return 1
    fi
    found=1
  done
  ((found))
}

ais_bench_available() {
  if [[ -n "${AIS_INFER:-}" ]]; then
    [[ -f "${AIS_INFER}" ]]
    return
  fi
  python3 -c 'import ais_bench' >/dev/null 2>&1
}

choose_backend() {
  local atc_path
  atc_path="$(command -v atc || true)"
  case "${BACKEND}" in
    ascend)
      [[ -n "${atc_path}" ]] || die "--backend ascend: 'atc' is not on PATH (source the CANN set_env.sh)"
      ais_bench_available || die "--backend ascend: ais_bench is not importable by python3 and AIS_INFER does not point to ais_infer.py"
      log "backend: ascend (asked for; atc: ${atc_path})"
      ;;
    ort)
      log "backend: ort (ONNX Runtime; asked for)"
      ;;
    auto)
      if [[ -z "${atc_path}" ]]; then
        BACKEND="ort"
        log "backend: ort (ONNX Runtime), because 'atc' is not on PATH (no CANN toolkit here)"
      elif ! ais_bench_available; then
        BACKEND="ort"
        log "backend: ort (ONNX Runtime), because atc is at ${atc_path} but ais_bench is not importable and AIS_INFER is not set"
      else
        BACKEND="ascend"
        log "backend: ascend, because atc is at ${atc_path} and ais_bench is available"
      fi
      ;;
  esac
}

# The atc SoC name: --soc_version, else "Ascend" + the chip name in `npu-smi info`.
soc_version() {
  local info chip
  if [[ -n "${SOC_VERSION}" ]]; then
    printf '%s' "${SOC_VERSION}"
    return
  fi
  command -v npu-smi >/dev/null || die "cannot tell the SoC: 'npu-smi' is not on PATH; pass --soc_version (e.g. Ascend310P3)"
  info="$(npu-smi info 2>&1)" || die "'npu-smi info' failed; pass --soc_version (e.g. Ascend310P3):"$'\n'"${info}"
  chip="$(grep -oE '(^|[[:space:]|])(310P[0-9]+|310B[0-9]+|910B[0-9]*|910[A-Z0-9]*|310)([[:space:]|]|$)' <<<"${info}" \
    | head -n 1 | tr -d '[:space:]|' || true)"
  [[ -n "${chip}" ]] || die "cannot find the chip name in 'npu-smi info'; pass --soc_version (e.g. Ascend310P3)"
  printf 'Ascend%s' "${chip}"
}

# find_outputs: set OUTPUTS to what the steps made in the work folder, for any batch size
# and model: prep_image_bs*/, beit_*.onnx (the export, onnxsim, graph_modify and their
# temporaries), beit_*.om, ais_out/, acc_bs*.json and atc's fusion_result.json.
OUTPUTS=()
find_outputs() {
  local restore path
  restore="$(shopt -p nullglob || true)"
  shopt -s nullglob
  OUTPUTS=()
  for path in "${WORKDIR}"/prep_image_bs* "${WORKDIR}"/beit_*.onnx "${WORKDIR}"/beit_*.om \
    "${WORKDIR}"/ais_out "${WORKDIR}"/acc_bs*.json "${WORKDIR}"/fusion_result.json; do
    if [[ -e "${path}" || -L "${path}" ]]; then
      OUTPUTS+=("${path}")
    fi
  done
  eval "${restore}"
}

# The inputs a work folder was made from.  Without --force, other inputs (or outputs with
# no record of their inputs) are refused.  With --force and other inputs, the outputs made
# from the old ones are deleted BEFORE the new record is written: a forced run that stops
# part-way must not leave old outputs that a later run without --force would take as made
# from the new inputs.
check_inputs_record() {
  local record="${WORKDIR}/${INPUTS_RECORD}" current previous=""
  current="$(printf 'image_path=%s\nlabel_file=%s\ncheckpoint=%s\nmodel=%s\n' \
    "${IMAGE_PATH}" "${LABEL_FILE}" "${CHECKPOINT}" "${MODEL:-${DEFAULT_MODEL}}")"
  [[ -f "${record}" ]] && previous="$(<"${record}")"
  [[ "${previous}" == "${current}" ]] && return 0
  find_outputs
  if ((!FORCE)); then
    if [[ -n "${previous}" ]]; then
      printf 'error: %s was made from other inputs:\n%s\nnow:\n%s\nuse --force to redo every step, or another --workdir\n' \
        "${WORKDIR}" "${previous}" "${current}" >&2
      exit 2
    elif ((${#OUTPUTS[@]} > 0)); then
      printf 'error: %s holds outputs (%s ...) but no %s saying which inputs they were made from;\nuse --force to redo every step, or another --workdir\n' \
        "${WORKDIR}" "${OUTPUTS[0]##*/}" "${INPUTS_RECORD}" >&2
      exit 2
    fi
  fi
  if ((${#OUTPUTS[@]} > 0)); then
    log "--force with other inputs: removing the ${#OUTPUTS[@]} outputs made from the previous ones (${OUTPUTS[*]##*/})"
    # The old record stays until they are gone: a kill in between leaves old outputs under the old record.
    rm -rf -- "${OUTPUTS[@]}"
  fi
  printf '%s\n' "${current}" >"${record}.tmp"
  mv -f "${record}.tmp" "${record}"
}

# check_model: refuse a --model that is unknown or does not take 224x224 images (the batch
# files, onnxsim's and atc's input shapes are 224x224).  The table is beit_model.py's
# KNOWN_VARIANTS, read from the source (importing beit_model would load torch: seconds).
check_model() {
  [[ -n "${MODEL}" ]] || return 0
  local verdict
  verdict="$(python3 -c 'import sys
sys.path.insert(0, sys.argv[1])
from beit_variants import KNOWN_VARIANTS as variants
name = sys.argv[2]
if name not in variants:
    print("unknown BEiT variant; known: " + ", ".join(sorted(variants)))
elif variants[name][3] != 224:
    ok = sorted(n for n, v in variants.items() if v[3] == 224)
    print("takes %dx%d images, but this pipeline is fixed at 224x224 (preprocessing, onnxsim and atc "
          "input shapes); use one of: %s" % (variants[name][3], variants[name][3], ", ".join(ok)))' \
    "${SCRIPT_DIR}" "${MODEL}")" || die "cannot read the BEiT variants from ${SCRIPT_DIR}/beit_variants.py"
  [[ -z "${verdict}" ]] || die "--model ${MODEL}: ${verdict}"
}

step_demo() {
  local demo="${WORKDIR}/demo" ok=0 cmd
  [[ -f "${demo}/demo.json" ]] && ok=1
  IMAGE_PATH="${demo}/images"
  LABEL_FILE="${demo}/val_label.txt"
  CHECKPOINT="${demo}/random_checkpoint.pth"
  log "demo: no --image_path/--label_file/--checkpoint given: a random BEiT on synthetic images, labelled with"
  log "demo: the PyTorch model's own predictions; Top-1 measures fidelity to PyTorch (100% expected), not ImageNet accuracy"
  should_run demo "${ok}" "${demo}" || return 0
  cmd=(python3 "${SCRIPT_DIR}/make_demo_data.py" --out "${demo}")
  [[ -n "${MODEL}" ]] && cmd+=(--model "${MODEL}")
  ((FORCE)) && cmd+=(--force)
  run_step demo "${cmd[@]}"
}

step_preprocess() {
  local prep="$1" ok=0
  manifest_complete "${prep}" && ok=1
  should_run preprocess "${ok}" "${prep}" demo || return 0
  # beit_preprocess.py resumes from the batches it finds; a redo must start from nothing.
  if ((FORCE || ok)) && [[ -e "${prep}" ]]; then
    log "removing ${prep} to redo it"
    rm -rf "${prep}"
  fi
  run_step preprocess python3 "${SCRIPT_DIR}/beit_preprocess.py" --image_path "${IMAGE_PATH}" \
    --prep_image "${prep}" --batch_size "${BATCH_SIZE}"
}

step_pth2onnx() {
  local onnx="$1" ok=0 cmd
  [[ -f "${onnx}" ]] && ok=1
  should_run pth2onnx "${ok}" "${onnx}" demo || return 0
  # The ONNX file has a dynamic batch axis and is shared by every batch size: the batch it
  # is traced with does not change a byte of it, and 1 is the fastest.
  cmd=(python3 "${SCRIPT_DIR}/beit_pth2onnx.py" --source "${CHECKPOINT}" --target "${onnx}"
    --batch_size 1)
  [[ -n "${MODEL}" ]] && cmd+=(--model "${MODEL}")
  run_step pth2onnx "${cmd[@]}"
}

step_onnxsim() {
  local onnx="$1" sim="$2" ok=0 partial
  [[ -f "${sim}" ]] && ok=1
  should_run onnxsim "${ok}" "${sim}" pth2onnx || return 0
  # onnxsim writes in place; it writes to a temporary name that only a checked model leaves.
  partial="${sim%.onnx}.partial.onnx"
  rm -f "${partial}"
  run_step onnxsim python3 -m onnxsim "${onnx}" "${partial}" \
    --overwrite-input-shape "${BATCH_SIZE},3,224,224"
  run_step onnx_check python3 "${SCRIPT_DIR}/onnx_check.py" "${onnx}" "${partial}" --batch_size "${BATCH_SIZE}"
  mv -f "${partial}" "${sim}"
}

step_graph_modify() {
  local sim="$1" mg="$2" ok=0
  [[ -f "${mg}" ]] && ok=1
  should_run graph_modify "${ok}" "${mg}" onnxsim || return 0
  run_step graph_modify python3 "${SCRIPT_DIR}/graph_modify.py" "${sim}" "${mg}" "${BATCH_SIZE}"
}

step_atc() {
  local mg="$1" om="$2" ok=0 soc stem partial
  [[ -f "${om}" ]] && ok=1
  should_run atc "${ok}" "${om}" graph_modify || return 0
  soc="$(soc_version)"
  # atc writes <output>.om in place: build under a temporary name, then rename.
  stem="${om%.om}"
  partial="${stem}_partial"
  rm -f "${partial}.om"
  run_step atc atc --framework=5 --model="${mg}" --output="${partial}" --input_format=NCHW \
    --input_shape="image:${BATCH_SIZE},3,224,224" --log=error --soc_version="${soc}" \
    --optypelist_for_implmode="Gelu" --op_select_implmode=high_performance
  [[ -f "${partial}.om" ]] || {
    printf "error: step 'atc' wrote no %s\n" "${partial}.om" >&2
    exit 1
  }
  mv -f "${partial}.om" "${om}"
}

# Inference into ais_out/bs{N}_partial, renamed to ais_out/bs{N} when it is complete;
# its stdout is kept in ais_out/bs{N}.log (first line: the backend) for the summary.
# can_resume_partial DIR DEP: 0 when DIR holds outputs of an interrupted ONNX Runtime run that
# are still valid: same backend, no --force, and neither preprocess nor the model step ran again.
can_resume_partial() {
  local partial="$1" dep="$2"
  [[ "${BACKEND}" == ort ]] || return 1
  ((FORCE)) && return 1
  [[ -z "${RAN[preprocess]:-}" && -z "${RAN[${dep}]:-}" ]] || return 1
  [[ -d "${partial}" && -f "${partial}.log" ]] || return 1
  [[ "$(head -n 1 "${partial}.log")" == "backend: ${BACKEND}" ]]
}

step_infer() {
  local prep="$1" model="$2" name="$3" dep="$4"
  local out_root="${WORKDIR}/ais_out" dirname="bs${BATCH_SIZE}" ok=0
  local final="${out_root}/${dirname}" partial="${out_root}/bs${BATCH_SIZE}_partial"
  local log_file="${out_root}/bs${BATCH_SIZE}.log" recorded="" cmd
  [[ -f "${log_file}" ]] && recorded="$(head -n 1 "${log_file}")"
  if outputs_complete "${prep}" "${final}"; then
    if [[ "${recorded}" == "backend: ${BACKEND}" ]]; then
      ok=1
    else
      log "redo ${name}: ${final} holds outputs of another backend (${recorded:-unknown})"
    fi
  fi
  should_run "${name}" "${ok}" "${final}" preprocess "${dep}" || return 0
  mkdir -p "${out_root}"
  if can_resume_partial "${partial}" "${dep}"; then
    # beit_infer.py keeps the complete outputs of an interrupted run and computes the rest:
    # on 50,000 images a kill must not cost the hour already spent.
    log "resume ${name}: keeping the outputs already in ${partial}"
  else
    rm -rf "${partial}" "${partial}_summary.json" "${partial}.log"
  fi
  if [[ "${BACKEND}" == ascend ]]; then
    if [[ -n "${AIS_INFER:-}" ]]; then
      cmd=(python3 "${AIS_INFER}")
    else
      cmd=(python3 -m ais_bench)
    fi
    cmd+=(--model "${model}" --input "${prep}" --output "${out_root}" --output_dirname "bs${BATCH_SIZE}_partial"
      --outfmt TXT --batchsize "${BATCH_SIZE}" --device "${DEVICE}")
  else
    cmd=(python3 "${SCRIPT_DIR}/beit_infer.py" --model "${model}" --input "${prep}" --output "${out_root}"
      --output_dirname "bs${BATCH_SIZE}_partial" --outfmt TXT --batchsize "${BATCH_SIZE}")
  fi
  printf 'backend: %s\n' "${BACKEND}" >"${partial}.log"
  STEP_LOG="${partial}.log"
  run_step "${name}" "${cmd[@]}"
  STEP_LOG=""
  outputs_complete "${prep}" "${partial}" || {
    printf "error: step '%s' left outputs missing in %s\n" "${name}" "${partial}" >&2
    exit 1
  }
  rm -rf "${final}"
  mv "${partial}" "${final}"
  [[ -f "${partial}_summary.json" ]] && mv -f "${partial}_summary.json" "${final}_summary.json"
  mv -f "${partial}.log" "${log_file}"
}

step_eval() {
  local prep="$1" acc="$2" ok=0 name="$3"
  [[ -f "${acc}" ]] && ok=1
  should_run eval "${ok}" "${acc}" "${name}" || return 0
  run_step eval python3 "${SCRIPT_DIR}/beit_eval_acc.py" --folder_davinci_target "${WORKDIR}/ais_out/bs${BATCH_SIZE}" \
    --annotation_file_path "${LABEL_FILE}" --result_json_path "${WORKDIR}" --json_file_name "$(basename "${acc}")" \
    --batch_size "${BATCH_SIZE}" --prep_image "${prep}"
}

# The value after the last ':' of the last stdout line that mentions throughput.
read_throughput() {
  local log_file="$1" summary="$2" line value=""
  if [[ -f "${log_file}" ]]; then
    line="$(grep -i 'throughput' "${log_file}" | tail -n 1 || true)"
    if [[ -n "${line}" && "${line}" == *:* ]]; then
      value="${line##*:}"
      value="${value//[[:space:]]/}"
    fi
  fi
  if [[ -z "${value}" && -f "${summary}" ]]; then
    value="$(py_json_field "${summary}" throughput || true)"
  fi
  printf '%s' "${value:-n/a}"
}

# "TOP1 TOP5 IMAGES THROUGHPUT" from the result JSON and the throughput text, formatted by
# Python (bash's printf follows the locale's decimal point).
summary_fields() {
  python3 -c 'import json, sys
with open(sys.argv[1], encoding="utf-8") as f:
    r = json.load(f)
try:
    tput = "%.2f" % float(sys.argv[2])
except ValueError:
    tput = "n/a"
print("%.2f %.2f %d %s" % (float(r["top1"]), float(r["top5"]), int(r["num_images"]), tput))' "$1" "$2" 2>/dev/null
}

print_summary() {
  local acc="$1" backend fields top1 top5 images tput
  tput="$(read_throughput "${WORKDIR}/ais_out/bs${BATCH_SIZE}.log" "${WORKDIR}/ais_out/bs${BATCH_SIZE}_summary.json")"
  fields="$(summary_fields "${acc}" "${tput}")" ||
    die "${acc}: the result JSON lacks numeric 'top1', 'top5' or 'num_images'"
  read -r top1 top5 images tput <<<"${fields}"
  backend="${BACKEND}"
  [[ "${backend}" == ort ]] && backend="ort (ONNX Runtime)"
  printf '\n'
  printf '| %-20s | %5s | %6s | %9s | %9s | %18s |\n' backend batch images "Top-1 (%)" "Top-5 (%)" "throughput (img/s)"
  printf '|%s|%s|%s|%s|%s|%s|\n' "----------------------" "-------" "--------" "-----------" "-----------" "--------------------"
  printf '| %-20s | %5s | %6s | %9s | %9s | %18s |\n' "${backend}" "${BATCH_SIZE}" "${images}" "${top1}" "${top5}" "${tput}"
  if ((DEMO)); then
    printf '\nnote: this was the built-in demo: its labels are the PyTorch model'"'"'s own predictions, so Top-1/Top-5\n'
    printf 'measure fidelity to PyTorch (100%% expected), not ImageNet accuracy.  fp16 on an NPU may flip an image\n'
    printf 'whose two highest PyTorch logits are nearly tied (see min_top1_margin in demo/demo.json).\n'
  fi
  log "results: ${acc}"
}

main() {
  local run_start
  run_start="$(now_us)"
  parse_args "$@"
  # Keeps the steps' stdout in order with their stderr when this script's output is piped.
  export PYTHONUNBUFFERED=1
  command -v python3 >/dev/null || die "python3 is not on PATH (make demo puts .venv/bin first)"
  check_model
  mkdir -p "${WORKDIR}" || die "cannot create the work folder ${WORKDIR}"
  log "work folder: ${WORKDIR}"
  choose_backend

  local n="${BATCH_SIZE}"
  local prep="${WORKDIR}/prep_image_bs${n}"
  local onnx="${WORKDIR}/${MODEL:-${DEFAULT_MODEL}}.onnx"
  local sim="${WORKDIR}/beit_onnxsim_bs${n}.onnx"
  local mg="${WORKDIR}/beit_mg_bs${n}.onnx"
  local om="${WORKDIR}/beit_mg_bs${n}.om"
  local acc="${WORKDIR}/acc_bs${n}.json"

  check_inputs_record
  if ((DEMO)); then
    step_demo
  fi
  step_preprocess "${prep}"
  step_pth2onnx "${onnx}"
  step_onnxsim "${onnx}" "${sim}"
  step_graph_modify "${sim}" "${mg}"
  if [[ "${BACKEND}" == ascend ]]; then
    step_atc "${mg}" "${om}"
    step_infer "${prep}" "${om}" ais_bench atc
    step_eval "${prep}" "${acc}" ais_bench
  else
    step_infer "${prep}" "${mg}" beit_infer graph_modify
    step_eval "${prep}" "${acc}" beit_infer
  fi
  print_summary "${acc}"
  log "total time $(seconds_since "${run_start}") s"
}

# Sourcing the file (for tests of its functions) defines them without running the pipeline.
if [[ "${BASH_SOURCE[0]}" == "${0}" ]]; then
  main "$@"
fi
