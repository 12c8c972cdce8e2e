"""Write tests/data/hf_beit_tiny.json with Hugging Face transformers (not a test dependency: run it by hand).

    PYTHONPATH=/path/to/transformers/site-packages .venv/bin/python tests/data/make_hf_beit_fixture.py

For two tiny BeitForImageClassification configurations (per-block relative position bias with mean
pooling, as microsoft/beit-base-patch16-224; one shared bias with the cls token and a final layernorm)
it records the keys and shapes exactly as save_pretrained writes them to model.safetensors, and
transformers' own logits for the weights tests/helpers.seeded_state_dict makes from that key list on
onnx_models.random_batch((2, 3, 224, 224), seed=0).  tests/test_checkpoint_forms.py rebuilds the same
weights, saves them in Hugging Face's forms and checks that the exported ONNX gives these logits.
layer_norm_eps is unilm's 1e-6 here (transformers' configs say 1e-12; the export uses unilm's 1e-6).
"""

import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from helpers import seeded_state_dict  # noqa: E402

from beit_pipeline.inference import sessions as onnx_models  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=224,
            patch_size=16, num_labels=1000, layer_norm_eps=1e-6, layer_scale_init_value=0.1,
            use_absolute_position_embeddings=False)
CONFIGS = {
    "per_block_mean_pooling": dict(TINY, use_relative_position_bias=True, use_mean_pooling=True),
    "shared_bias_cls_token": dict(TINY, use_shared_relative_position_bias=True, use_mean_pooling=False),
}


def record(name, options):
    import transformers
    from safetensors import safe_open

    model = transformers.BeitForImageClassification(transformers.BeitConfig(**options)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        with safe_open(os.path.join(tmp, "model.safetensors"), "pt") as f:
            keys = [[k, list(f.get_slice(k).get_shape())] for k in f.keys()]
    weights = seeded_state_dict(keys)
    # transformers >= 5 names its modules differently and renames the Hub's keys on load: load through a file.
    with tempfile.TemporaryDirectory() as tmp:
        from safetensors.torch import save_file
        save_file(weights, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model, info = transformers.BeitForImageClassification.from_pretrained(tmp, output_loading_info=True)
    model.eval()
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    batch = torch.from_numpy(onnx_models.random_batch((2, 3, 224, 224), seed=0))
    with torch.no_grad():
        logits = model(pixel_values=batch).logits.numpy()
    print(f"{name}: {len(keys)} keys, logits {logits.shape}, top-1 {logits.argmax(1).tolist()}")
    return {"config": options, "keys": keys, "logits": [[float(f"{v:.7g}") for v in row] for row in logits]}


def main():
    import transformers
    fixture = {"transformers_version": transformers.__version__, "input": "onnx_models.random_batch((2, 3, 224, 224), "
               "seed=0)", "weights": "tests/helpers.seeded_state_dict(keys)",
               "configs": {name: record(name, options) for name, options in CONFIGS.items()}}
    with open(os.path.join(HERE, "hf_beit_tiny.json"), "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
