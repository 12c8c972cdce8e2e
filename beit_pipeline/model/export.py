"""ONNX export of a timm BEiT with the TorchScript exporter (opset 11 for the guide's atc), and its checks.

beit_pth2onnx.py is the command line over this module: load_torch_model() reads and
identifies the checkpoint, export() writes the graph, check_exported_graph() checks its
interface and verify() compares ONNX Runtime with PyTorch on seeded batches.
torch and timm are imported inside the functions, so that importing this module
(the scripts' argument checks) stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import types
import warnings
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from beit_pipeline.errors import ExportError

if TYPE_CHECKING:
    import os

    import torch
    from timm.models.beit import Beit

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "class"
MIN_OPSET, MAX_OPSET = 11, 17
DEFAULT_TOLERANCE = 1e-4


def unilm_attention_forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    """timm's BEiT attention (fused attention off) with q, k, v taken as unilm takes them.

    unilm's beit/modeling_finetune.py Attention.forward indexes ``q, k, v = qkv[0], qkv[1], qkv[2]``
    ("make torchscript happy"), which exports as three Gathers; timm's ``qkv.unbind(0)`` exports as
    Split + Squeeze, where the guide's graph_modify.py (refill_zero_gather: every Gather whose index
    is 1) finds nothing to edit.  The arithmetic is the same, so the outputs are too.
    """
    import torch
    import torch.nn.functional as F

    B, N, C = x.shape
    bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
    qkv = F.linear(x, weight=self.qkv.weight, bias=bias if bias is not None else self.qkv.bias)
    qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if self.relative_position_bias_table is not None:
        attn = attn + self._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        attn = attn + shared_rel_pos_bias
    x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


@contextlib.contextmanager
def unilm_qkv_indexing(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every BEiT block's attention runs unilm_attention_forward inside the block, timm's own after it."""
    attentions = [block.attn for block in getattr(model, "blocks", [])]
    for attn in attentions:
        attn.forward = types.MethodType(unilm_attention_forward, attn)
    try:
        yield model
    finally:
        for attn in attentions:
            del attn.forward


def export(model: torch.nn.Module, path: str, batch_size: int, img_size: int, opset: int, dynamic: bool) -> None:
    """Write ``model`` to ``path`` with the TorchScript exporter, q/k/v indexed as unilm does."""
    import torch

    dummy = torch.zeros(batch_size, 3, img_size, img_size)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (opset 11 for atc); timm's image-size
        # assert traces to a constant, which is right because H and W are fixed.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with torch.no_grad(), unilm_qkv_indexing(model):
            torch.onnx.export(model, (dummy,), path, dynamo=False, export_params=True, opset_version=opset,
                              do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes)


def describe_foreign_checkpoint(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why a state dict that build_model refused is not a fine-tuned BEiT, when that can be told; else None."""
    keys = set(state_dict)
    if "head.weight" not in keys and ({"lm_head.weight", "mask_token"} & keys):
        return ("this is a BEiT pretraining checkpoint (it has "
                + " and ".join(sorted({"lm_head.weight", "mask_token"} & keys))
                + " but no classification head 'head.weight'); export needs a fine-tuned checkpoint "
                  "such as beit_base_patch16_224_pt22k_ft22kto1k.pth")
    if "patch_embed.proj.weight" not in keys and not any(k.startswith("blocks.") for k in keys):
        shown = ", ".join(sorted(keys)[:6]) + (", ..." if len(keys) > 6 else "")
        return f"this is not a BEiT checkpoint: no patch_embed / blocks tensors (its keys: {shown})"
    return None


def load_torch_model(source: str | os.PathLike[str], model_name: str | None = None,
               weights: str = "auto") -> tuple[Beit, dict[str, Any], str | None]:
    """(model, config, variant name) for a checkpoint in any form of checkpoints.py; CheckpointError otherwise.

    Logs one line saying which form was read and which weights were used.
    """
    from beit_pipeline.model import build as beit_model

    checkpoint = beit_model.read_checkpoint(source, weights)
    log.info(checkpoint.describe())
    state_dict = checkpoint.state_dict
    try:
        return beit_model.build_model(state_dict, model_name)
    except beit_model.CheckpointError as exc:
        hint = describe_foreign_checkpoint(state_dict)
        message = f"{source}: {hint}\n{exc}" if hint else f"{source}: {exc}"
        raise beit_model.CheckpointError(message) from exc


def check_exported_graph(path: str, batch_size: int, num_classes: int, dynamic: bool) -> None:
    """The exported file is valid ONNX with the input and output the later steps expect."""
    import onnx

    onnx.checker.check_model(path)
    graph = onnx.load(path, load_external_data=False).graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"unexpected graph inputs {[i.name for i in inputs]} / outputs "
                          f"{[o.name for o in graph.output]}")
    batch_dim = inputs[0].type.tensor_type.shape.dim[0]
    if dynamic == batch_dim.HasField("dim_value") or (not dynamic and batch_dim.dim_value != batch_size):
        raise ExportError(f"input batch axis came out as {batch_dim}, expected "
                          f"{'dynamic' if dynamic else batch_size}")
    out_dims = graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) != 2 or out_dims[1].dim_value != num_classes:
        raise ExportError(f"output shape {[d.dim_value or d.dim_param for d in out_dims]}, "
                          f"expected (N, {num_classes})")


def verify(model: torch.nn.Module, path: str, batch_sizes: Iterable[int], img_size: int,
           seed: int = 0) -> list[tuple[int, dict[str, Any]]]:
    """[(batch size, output_errors dict)] of ONNX Runtime against PyTorch on seeded random batches."""
    import torch

    from beit_pipeline.inference import sessions as onnx_models

    session = onnx_models.open_session(path)
    results = []
    for n in batch_sizes:
        batch = onnx_models.random_batch((n, 3, img_size, img_size), seed)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        actual = onnx_models.run_session(session, batch, path)
        results.append((n, onnx_models.output_errors(actual, expected)))
    return results


def verification_sizes(batch_size: int, dynamic: bool) -> list[int]:
    """The traced batch size and, for a dynamic model, a second one: a batch size baked into a
    Reshape by the tracer would only show up there."""
    return [batch_size] + ([1 if batch_size != 1 else 2] if dynamic else [])
