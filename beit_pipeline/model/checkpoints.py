"""Every common form of a BEiT checkpoint, read safely and mapped to the layout the export uses (unilm's).

The forms (README, "Your files"):

- unilm's files: ``{'model': state_dict}``, a bare state dict, ``{'module': ...}``, ``{'state_dict': ...}``;
  a unilm training checkpoint that also holds ``model_ema``, the optimizer, the epoch and its argparse
  ``args`` (the only Python object allowed besides tensors and containers is ``argparse.Namespace``:
  a checkpoint never runs code); ``{'model_ema': ...}`` alone.  ``weights`` picks ``model`` or ``ema``.
- A DDP state dict: every key under ``module.`` (also ``_orig_mod.`` from torch.compile).
- Hugging Face transformers' ``BeitForImageClassification``: ``pytorch_model.bin`` or ``model.safetensors``
  (or the folder holding it), keys ``beit.encoder.layer.0.attention.attention.query.weight`` as
  save_pretrained writes them (and the module names of transformers >= 5, ``beit.layers.0.attention.q_proj``).
  The mapping is the reverse of transformers' models/beit/convert_beit_unilm_to_pytorch.py (rename_keys,
  read_in_q_k_v): query/key/value weights concatenated into ``qkv.weight``, query and value biases into
  ``q_bias``/``v_bias`` (the key projection has no bias, as in unilm), ``lambda_1/2`` -> ``gamma_1/2``,
  ``pooler.layernorm`` -> ``fc_norm`` (mean pooling) or ``beit.layernorm`` -> ``norm`` (cls token).
- timm's ``.safetensors`` (unilm key names).  Any ``.safetensors`` file is read with the safetensors
  library, which parses a JSON header and raw tensor bytes: no pickle at all.

One relative position bias shared by all blocks (unilm's ``rel_pos_bias.*``, transformers'
``encoder.relative_position_bias.*``) is copied into every block's table: the shared bias is added to every
block's attention scores, so a per-block copy computes exactly the same (as mmseg's beit2mmseg does).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import struct

from beit_pipeline.errors import CheckpointError

log = logging.getLogger(__name__)

WEIGHTS_CHOICES = ("auto", "model", "ema")
# Containers that hold a state dict, in the order `auto` prefers them; EMA ones only when nothing else is there.
MODEL_KEYS = ("model", "state_dict", "module")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema")
HF_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint's weights in unilm's layout, and how they were found."""

    state_dict: dict
    form: str  # "unilm training checkpoint", "Hugging Face transformers BeitForImageClassification", ...
    weights: str  # the container the weights came from: "model", "model_ema", ... or "" for a bare state dict
    notes: list = dataclasses.field(default_factory=list)  # "'module.' prefix removed", ...

    def describe(self) -> str:
        """One line: which form and which weights were used."""
        picked = f"'{self.weights}' weights" if self.weights else "its weights"
        notes = "; ".join(self.notes)
        return f"checkpoint: {self.form}, {picked}" + (f" ({notes})" if notes else "")


# ---------------------------------------------------------------- reading the file

def resolve_path(path: str) -> str:
    """A checkpoint file; a folder (a Hugging Face download) stands for the model file inside it."""
    if os.path.isdir(path):
        for name in HF_FILE_NAMES:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
            raise CheckpointError(f"{path}: a sharded Hugging Face checkpoint (model.safetensors.index.json); "
                                  "BEiT fits one file: save it with a larger max_shard_size")
        raise CheckpointError(f"{path}: a folder without {' or '.join(HF_FILE_NAMES)}; give the checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def is_safetensors(path: str) -> bool:
    """The safetensors layout: an 8-byte little-endian header length, then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length < os.path.getsize(path)


def read_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc


def refused_global(text: str) -> str:
    """The Python object torch's safe loader refused, from its message ('GLOBAL pathlib.PosixPath')."""
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"Unsupported (?:global|operand)[^A-Za-z]*([\w.]+)", text)
    return found.group(1) if found else "a Python object"


def read_pickle(path: str) -> object:
    """torch.load with weights_only=True: tensors, containers and argparse.Namespace only (unilm's args)."""
    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:  # mapped: a 1.2 GB large-512 checkpoint reads as fast as a tiny one
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) file
    except Exception as exc:  # torch raises many kinds here: pickle, zip, runtime
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise CheckpointError(
                f"{path}: refused: the file holds Python objects other than tensors, which could run code "
                f"when loaded ({refused_global(text)}); nothing was executed: re-save only the tensors "
                "(torch.save(ckpt['model'], ...)) from a source you trust") from exc
        first = text.splitlines()[0] if text else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first})") from exc


# ---------------------------------------------------------------- which weights

def is_state_dict(obj: object) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def pick_weights(obj: object, path: str, weights: str) -> tuple[dict, str, list]:
    """(state dict, container name or '', notes) for ``weights`` auto | model | ema."""
    if is_state_dict(obj):
        if weights == "ema":
            raise CheckpointError(f"{path}: --weights ema: a bare state dict holds one set of weights, no EMA")
        return obj, "", []
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors (it holds a {type(obj).__name__})")
    models = [k for k in MODEL_KEYS if is_state_dict(obj.get(k))]
    emas = [k for k in EMA_KEYS if is_state_dict(obj.get(k))]
    if weights == "ema" and not emas:
        raise CheckpointError(f"{path}: --weights ema: no EMA weights in it (its keys: {shown_keys(obj)}; "
                              f"EMA weights are under {' or '.join(EMA_KEYS)})")
    if weights == "model" and not models:
        raise CheckpointError(f"{path}: --weights model: no model weights in it (its keys: {shown_keys(obj)}; "
                              + ("it holds only EMA weights: --weights ema)" if emas else
                                 f"expected {' or '.join(MODEL_KEYS)})"))
    if not models and not emas:
        raise CheckpointError(f"{path}: does not hold a state dict of tensors (its keys: {shown_keys(obj)}; "
                              "expected {'model': state_dict}, {'model_ema': ...}, {'module': ...}, "
                              "{'state_dict': ...} or a bare state dict)")
    if weights == "ema" or not models:
        notes = [] if weights == "ema" else ["the only weights it holds"]
        return obj[emas[0]], emas[0], notes
    notes = [f"it also holds '{emas[0]}': --weights ema picks those"] if emas else []
    return obj[models[0]], models[0], notes


def shown_keys(obj: dict) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")


def strip_wrappers(state_dict: dict) -> tuple[dict, list]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) when every key has it."""
    notes = []
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                notes.append(f"'{prefix}' prefix removed" + (" (DDP)" if prefix == "module." else ""))
                changed = True
    return state_dict, notes


# ---------------------------------------------------------------- Hugging Face transformers' names

# (pattern on a per-layer key after 'beit.encoder.layer.N.' or 'beit.layers.N.', unilm name after 'blocks.N.')
HF_LAYER_NAMES = [
    (r"layernorm_before\.(weight|bias)", r"norm1.\1"),
    (r"layernorm_after\.(weight|bias)", r"norm2.\1"),
    (r"lambda_1", "gamma_1"),
    (r"lambda_2", "gamma_2"),
    (r"attention\.attention\.query\.bias|attention\.q_proj\.bias", "attn.q_bias"),
    (r"attention\.attention\.value\.bias|attention\.v_proj\.bias", "attn.v_bias"),
    (r"attention\.attention\.key\.bias|attention\.k_proj\.bias", "attn.k_bias"),
    (r"attention\.attention\.(query|key|value)\.weight", r"attn.\1.weight"),
    (r"attention\.q_proj\.weight", "attn.query.weight"),
    (r"attention\.k_proj\.weight", "attn.key.weight"),
    (r"attention\.v_proj\.weight", "attn.value.weight"),
    (r"(?:attention\.attention\.)?relative_position_bias\.relative_position_bias_table",
     "attn.relative_position_bias_table"),
    (r"(?:attention\.attention\.)?relative_position_bias\.relative_position_index", None),
    (r"attention\.output\.dense\.(weight|bias)|attention\.o_proj\.(weight|bias)", r"attn.proj.\1\2"),
    (r"intermediate\.dense\.(weight|bias)|mlp\.fc1\.(weight|bias)", r"mlp.fc1.\1\2"),
    (r"output\.dense\.(weight|bias)|mlp\.fc2\.(weight|bias)", r"mlp.fc2.\1\2"),
]
HF_TOP_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "shared_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "encoder.relative_position_bias.relative_position_index": None,
    "shared_position_bias.relative_position_index": None,
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.layernorm.weight": "fc_norm.weight",
    "pooler.layernorm.bias": "fc_norm.bias",
}
HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")


def is_hugging_face(state_dict: dict) -> bool:
    return any(k.startswith(("beit.encoder.layer.", "beit.layers.", "encoder.layer.")) for k in state_dict)


def hf_name(key: str) -> str | None:
    """The unilm name of one transformers key (None: a buffer timm makes itself); CheckpointError if unknown."""
    if key in ("classifier.weight", "classifier.bias"):
        return "head." + key.split(".")[1]
    key = key[len("beit."):] if key.startswith("beit.") else key
    if key in HF_TOP_NAMES:
        return HF_TOP_NAMES[key]
    found = HF_LAYER.match(key)
    if found:
        for pattern, target in HF_LAYER_NAMES:
            if re.fullmatch(pattern, found.group(2)):
                return None if target is None else f"blocks.{found.group(1)}." + re.sub(pattern, target, found.group(2))
    raise CheckpointError(f"a Hugging Face BEiT key this pipeline does not know: {key}")


def from_hugging_face(state_dict: dict) -> tuple[dict, list]:
    """transformers' BeitForImageClassification keys -> unilm's, q/k/v fused as unilm stores them."""
    import torch

    renamed = {}
    for key, value in state_dict.items():
        name = hf_name(key)
        if name is not None:
            renamed[name] = value
    notes = []
    for prefix in sorted({k.rsplit(".", 2)[0] for k in renamed if k.endswith(".query.weight")}):
        parts = [renamed.pop(f"{prefix}.{p}.weight") for p in ("query", "key", "value")]
        renamed[f"{prefix}.qkv.weight"] = torch.cat(parts, dim=0)
        key_bias = renamed.pop(f"{prefix}.k_bias", None)
        if key_bias is not None and bool(torch.any(key_bias != 0)):
            raise CheckpointError(f"{prefix}: the key projection has a non-zero bias; BEiT's has none")
    if "fc_norm.weight" in renamed:
        notes.append("pooler layernorm -> fc_norm (mean pooling)")
    return renamed, notes


def unshare_relative_position_bias(state_dict: dict) -> tuple[dict, list]:
    """A table shared by all blocks, copied into each block: the same bias added to every block's scores."""
    shared = state_dict.get("rel_pos_bias.relative_position_bias_table")
    if shared is None or "head.weight" not in state_dict:
        return state_dict, []  # a pretraining checkpoint (no head) is refused later, naming what it is
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("rel_pos_bias.")}
    blocks = sorted({int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")})
    for i in blocks:
        key = f"blocks.{i}.attn.relative_position_bias_table"
        if key in state_dict:
            raise CheckpointError(f"{key}: the checkpoint has both a shared and a per-block relative position bias")
        state_dict[key] = shared.clone()
    return state_dict, [f"shared relative position bias copied into each of the {len(blocks)} blocks"]


# ---------------------------------------------------------------- the one entry point

def read_checkpoint(path: str | os.PathLike, weights: str = "auto") -> Checkpoint:
    """The checkpoint at ``path`` in unilm's layout; CheckpointError naming the file on any problem."""
    if weights not in WEIGHTS_CHOICES:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}")
    path = resolve_path(os.fspath(path))
    safetensors = is_safetensors(path)
    obj = read_safetensors(path) if safetensors else read_pickle(path)
    state_dict, container, notes = pick_weights(obj, path, weights)
    state_dict, stripped = strip_wrappers(state_dict)
    hugging_face = is_hugging_face(state_dict)
    if hugging_face:
        try:
            state_dict, mapped = from_hugging_face(state_dict)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    else:
        mapped = []
    state_dict, unshared = unshare_relative_position_bias(state_dict)
    form = describe_form(path, obj, container, safetensors, hugging_face)
    return Checkpoint(state_dict, form, container, notes + stripped + mapped + unshared)


def describe_form(path: str, obj: object, container: str, safetensors: bool, hugging_face: bool) -> str:
    name = os.path.basename(path)
    if hugging_face:
        return (f"Hugging Face transformers BeitForImageClassification ({name}"
                f"{', read without pickle' if safetensors else ''})")
    if safetensors:
        return f"timm/unilm state dict in safetensors ({name}, read without pickle)"
    if isinstance(obj, dict) and "args" in obj and isinstance(obj["args"], argparse.Namespace):
        others = [k for k in obj if k != container and isinstance(k, str)]
        return f"unilm training checkpoint ({name}; also holds {', '.join(others)})"
    if container:
        return f"{{'{container}': state_dict}} ({name})"
    return f"bare state dict ({name})"
