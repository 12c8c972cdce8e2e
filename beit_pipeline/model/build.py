"""The BEiT model behind the pipeline: checkpoints in, timm modules out.

Shared by beit_pth2onnx.py (step 2), the demo data maker and the benchmarks.
It reads a checkpoint in any of the forms of checkpoints.py (unilm's, DDP, EMA,
Hugging Face transformers', safetensors) safely (a checkpoint never runs code),
works out which BEiT variant its tensor shapes describe, and builds timm's
BEiT with fused attention off so that the TorchScript exporter can write
opset 11.  It also makes randomly initialised checkpoints in the real unilm
format, for tests and for the demo.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

# timm's fused (SDPA) attention only exports at opset >= 14; the guide's atc takes opset 11.
import timm.layers
import torch

timm.layers.set_fused_attn(False)

from timm.models.beit import Beit, checkpoint_filter_fn  # noqa: E402

from beit_pipeline import files  # noqa: E402
from beit_pipeline.model.checkpoints import CheckpointError, read_checkpoint  # noqa: E402,F401  (re-exported)
from beit_pipeline.model.variants import KNOWN_VARIANTS  # noqa: E402  (re-exported)

if TYPE_CHECKING:
    import os


def load_state_dict(path: str | os.PathLike[str], weights: str = "auto") -> dict[str, torch.Tensor]:
    """The checkpoint's state dict in unilm's layout, never running pickled code (every form: checkpoints.py)."""
    return read_checkpoint(path, weights).state_dict


def infer_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Model keyword arguments read off the checkpoint's tensor shapes."""
    try:
        proj = state_dict["patch_embed.proj.weight"]
        embed_dim, in_chans, patch, _ = proj.shape
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        table = state_dict["blocks.0.attn.relative_position_bias_table"]
        num_heads = table.shape[1]
        # (2*W-1)^2 + 3 entries for a W x W patch grid
        grid = int(round(((table.shape[0] - 3) ** 0.5 + 1) / 2))
        num_classes = state_dict["head.weight"].shape[0]
        mlp_hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(
            f"the checkpoint is not a fine-tuned BEiT with relative position bias and a classification head "
            f"(missing or odd tensor: {exc})") from exc
    return dict(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_hidden / embed_dim,
        use_abs_pos_emb="pos_embed" in state_dict, use_rel_pos_bias=True,
        init_values=0.1 if "blocks.0.gamma_1" in state_dict else None,
        use_fc_norm="fc_norm.weight" in state_dict,
        global_pool="avg" if "fc_norm.weight" in state_dict else "token",
    )


def variant_name(config: dict[str, Any]) -> str | None:
    """The published name for a configuration, or None."""
    for name, (dim, depth, heads, size) in KNOWN_VARIANTS.items():
        if (config["embed_dim"], config["depth"], config["num_heads"], config["img_size"]) == (dim, depth, heads, size) \
                and config["patch_size"] == 16:
            return name
    return None


def config_for(name: str, num_classes: int = 1000) -> dict[str, Any]:
    """Keyword arguments for a known variant name."""
    if name not in KNOWN_VARIANTS:
        raise CheckpointError(f"unknown model {name!r}; known: {', '.join(KNOWN_VARIANTS)}")
    dim, depth, heads, size = KNOWN_VARIANTS[name]
    return dict(img_size=size, patch_size=16, in_chans=3, num_classes=num_classes, embed_dim=dim, depth=depth,
                num_heads=heads, mlp_ratio=4.0, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1,
                use_fc_norm=True, global_pool="avg")


def create_model(config: dict[str, Any]) -> Beit:
    if "use_fc_norm" not in inspect.signature(Beit.__init__).parameters:
        # timm < 1.0.31 has no use_fc_norm and derives it from global_pool == 'avg'.
        config = {k: v for k, v in config.items() if k != "use_fc_norm"}
    model = Beit(**config)
    model.eval()
    return model


def build_model(state_dict: dict[str, torch.Tensor],
                model_name: str | None = None) -> tuple[Beit, dict[str, Any], str | None]:
    """A timm BEiT in eval mode with the checkpoint loaded strictly.

    Returns (model, config, name).  Raises CheckpointError listing missing keys,
    unexpected keys and shape mismatches when the checkpoint does not fit.
    """
    inferred = infer_config(state_dict)
    name = variant_name(inferred)
    if model_name is not None:
        config = config_for(model_name, inferred["num_classes"])
        if name != model_name:
            # Build what was asked for; the strict load below says what does not fit.
            hint = f" The checkpoint's shapes fit {name}." if name else ""
            config_mismatch = f"--model {model_name} does not match the checkpoint.{hint}"
        else:
            config_mismatch = None
        name = model_name
    else:
        config, config_mismatch = inferred, None
    model = create_model(config)
    try:
        filtered = checkpoint_filter_fn(dict(state_dict), model)
    except (AttributeError, RuntimeError, ValueError):
        # timm's filter looks up the block of every relative-position table and fails on a
        # checkpoint with more blocks than the model; compare keys as they are instead, so
        # that the report below says what does not fit.
        filtered = {k: v for k, v in state_dict.items() if "relative_position_index" not in k}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(filtered))
    unexpected = sorted(set(filtered) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(filtered[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(filtered) & set(expected) if filtered[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        lines = [f"the checkpoint does not fit {name or 'the BEiT configuration read from it'}:"]
        if config_mismatch:
            lines.append(config_mismatch)
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {title}: {shown}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(filtered, strict=True)
    return model, config, name


def random_checkpoint(name: str = "beit_base_patch16_224", seed: int = 0,
                      num_classes: int = 1000) -> dict[str, dict[str, torch.Tensor]]:
    """A randomly initialised checkpoint in the real unilm format: ``{'model': state_dict}``.

    Every tensor is random, including the ones that timm initialises to zero or
    to one constant (relative position bias tables, q/v biases, layer scales),
    so that the exported graph has the same structure as a real fine-tuned
    model's: an Add of the relative position bias before every Softmax, qkv
    biases and distinct per-block scales that no simplifier can fold away.
    The ``relative_position_index`` buffers are included, as unilm saves them.
    """
    config = config_for(name, num_classes)
    torch.manual_seed(seed)
    model = create_model(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        if not value.is_floating_point():
            state[key] = value.clone()
            continue
        if key.endswith("relative_position_bias_table"):
            new = torch.randn(value.shape, generator=gen) * 1.0
        elif "gamma" in key:
            new = 0.1 + 0.05 * torch.randn(value.shape, generator=gen)
        elif key.endswith(("norm1.weight", "norm2.weight", "fc_norm.weight")):
            new = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
        elif value.ndim == 1 or key == "cls_token":
            new = 0.05 * torch.randn(value.shape, generator=gen)
        else:
            new = torch.randn(value.shape, generator=gen) / value[0].numel() ** 0.5  # 1/sqrt(fan-in)
        state[key] = new.to(value.dtype)
    for i, block in enumerate(model.blocks):
        state[f"blocks.{i}.attn.relative_position_index"] = block.attn.relative_position_index.clone()
    return {"model": state}


def save_random_checkpoint(path: str | os.PathLike[str], name: str = "beit_base_patch16_224", seed: int = 0) -> None:
    """Write random_checkpoint() to ``path`` atomically: a killed run leaves no truncated file to reuse."""
    with files.temporary_beside(path) as tmp:
        # Through a file object: torch.save names the archive's folder after a path it is given (here the random
        # temporary name), which made two saves of the same weights differ and the checkpoint's SHA-256 change.
        with open(tmp, "wb") as f:
            torch.save(random_checkpoint(name, seed), f)
        files.publish_temporary(tmp, path)
