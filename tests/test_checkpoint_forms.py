"""Every checkpoint form beit_pth2onnx.py reads (beit_pipeline/model/checkpoints.py) exports the unilm form's logits.

Each test builds a tiny checkpoint in one form from the same weights as a unilm ``{'model': ...}`` file,
exports both with beit_pth2onnx.py and compares ONNX Runtime's logits (bit-identical: the same weights
make the same graph).  Hugging Face transformers' form is checked against transformers' own forward pass:
tests/data/hf_beit_tiny.json holds the key list save_pretrained writes (transformers 5.25.0) and the
logits transformers computed for the weights tests/helpers.seeded_state_dict makes from it
(tests/data/make_hf_beit_fixture.py).  transformers itself is not installed for the tests (12 packages,
167 MB, 21 s more for every CI install); the mapping follows transformers'
models/beit/convert_beit_unilm_to_pytorch.py (rename_keys, read_in_q_k_v) in reverse.
"""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from helpers import REPO, TINY, seeded_state_dict

import beit_pth2onnx
from beit_pipeline.model import checkpoints
from beit_pipeline.inference import sessions as onnx_models
from beit_pipeline.model import build as beit_model

FIXTURE = os.path.join(REPO, "tests", "data", "hf_beit_tiny.json")
BATCH = onnx_models.random_batch((2, 3, 224, 224), seed=0)


def export_logits(source, tmp_path, capsys, *flags):
    """(logits of the exported ONNX on BATCH, the checkpoint line beit_pth2onnx.py printed)."""
    target = tmp_path / f"export_{len(os.listdir(tmp_path))}.onnx"
    rc = beit_pth2onnx.main(["--source", str(source), "--target", str(target), "--no_verify", *flags])
    out, err = capsys.readouterr()
    assert rc == 0, err
    line = next(text for text in out.splitlines() if text.startswith("checkpoint: "))
    return onnx_models.run_session(onnx_models.open_session(str(target)), BATCH), line


@pytest.fixture(scope="module")
def weights():
    """Two different sets of tiny unilm weights: the 'model' and the 'model_ema' of the forms below."""
    return (beit_model.random_checkpoint(TINY, seed=11)["model"], beit_model.random_checkpoint(TINY, seed=12)["model"])


@pytest.fixture(scope="module")
def unilm_logits(weights, tmp_path_factory):
    """The reference: each set of weights saved as unilm saves it, {'model': state_dict}, and exported."""
    folder = tmp_path_factory.mktemp("unilm")
    result = []
    for i, state in enumerate(weights):
        path, target = folder / f"unilm_{i}.pth", folder / f"unilm_{i}.onnx"
        torch.save({"model": state}, path)
        assert beit_pth2onnx.main(["--source", str(path), "--target", str(target), "--no_verify"]) == 0
        result.append(onnx_models.run_session(onnx_models.open_session(str(target)), BATCH))
    assert not np.allclose(result[0], result[1])  # the two sets differ, so picking the wrong one shows
    return result


def training_checkpoint(model, ema):
    """A unilm run_class_finetuning.py checkpoint: weights, EMA, optimizer state, epoch and the argparse args."""
    args = argparse.Namespace(model="beit_base_patch16_224", lr=5e-4, layer_decay=0.65, nb_classes=1000,
                              data_path="/data/imagenet", color_jitter=None, model_ema=True, input_size=224)
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(4)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}]}
    return {"model": model, "model_ema": ema, "optimizer": optimizer, "epoch": 29, "scaler": {"scale": 65536.0},
            "args": args}


FORMS = {
    # name: (make the saved object from (model, ema) weights, extra flags, which weights it must use, line)
    "ddp": (lambda m, e: {"module." + k: v for k, v in m.items()}, [], 0, "'module.' prefix removed (DDP)"),
    "ddp_in_state_dict": (lambda m, e: {"state_dict": {"module." + k: v for k, v in m.items()}, "epoch": 3}, [], 0,
                          "'state_dict' weights ('module.' prefix removed (DDP))"),
    "ema_alone": (lambda m, e: {"model_ema": e}, [], 1, "'model_ema' weights (the only weights it holds)"),
    # model + model_ema, with and without --weights ema, in the full training checkpoint (args included)
    "training_with_args": (training_checkpoint, [], 0, "unilm training checkpoint (ckpt.pth; also holds model_ema, "
                                                        "optimizer, epoch, scaler, args), 'model' weights (it also "
                                                        "holds 'model_ema': --weights ema picks those)"),
    "training_with_args_ema": (training_checkpoint, ["--weights", "ema"], 1, "'model_ema' weights"),
}


@pytest.mark.parametrize("form", FORMS)
def test_pickled_form_exports_the_unilm_logits(form, weights, unilm_logits, tmp_path, capsys):
    make, flags, which, expected_line = FORMS[form]
    path = tmp_path / "ckpt.pth"
    torch.save(make(*weights), path)
    logits, line = export_logits(path, tmp_path, capsys, *flags)
    assert expected_line in line
    np.testing.assert_array_equal(logits, unilm_logits[which])


def test_timm_safetensors_read_without_pickle(weights, unilm_logits, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in weights[0].items()}, str(path))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a safetensors file went through pickle"))
    logits, line = export_logits(path, tmp_path, capsys)
    assert "safetensors (model.safetensors, read without pickle)" in line
    np.testing.assert_array_equal(logits, unilm_logits[0])


def hf_fixture(name):
    with open(FIXTURE) as f:
        record = json.load(f)["configs"][name]
    return seeded_state_dict(record["keys"]), np.array(record["logits"], dtype=np.float32)


def unilm_from_hf(hf):
    """The test's own reading of transformers' convert_beit_unilm_to_pytorch.py, written out key by key."""
    out = {}
    for key, value in hf.items():
        key = key.removeprefix("beit.")
        if key.startswith("encoder.layer."):
            i, rest = key.split(".")[2], ".".join(key.split(".")[3:])
            names = {"layernorm_before.weight": "norm1.weight", "layernorm_before.bias": "norm1.bias",
                     "layernorm_after.weight": "norm2.weight", "layernorm_after.bias": "norm2.bias",
                     "lambda_1": "gamma_1", "lambda_2": "gamma_2",
                     "attention.attention.query.bias": "attn.q_bias", "attention.attention.value.bias": "attn.v_bias",
                     "attention.attention.relative_position_bias.relative_position_bias_table":
                         "attn.relative_position_bias_table",
                     "attention.output.dense.weight": "attn.proj.weight", "attention.output.dense.bias": "attn.proj.bias",
                     "intermediate.dense.weight": "mlp.fc1.weight", "intermediate.dense.bias": "mlp.fc1.bias",
                     "output.dense.weight": "mlp.fc2.weight", "output.dense.bias": "mlp.fc2.bias"}
            if rest in names:
                out[f"blocks.{i}.{names[rest]}"] = value
            continue
        out[{"embeddings.cls_token": "cls_token", "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias", "layernorm.weight": "norm.weight",
             "layernorm.bias": "norm.bias", "pooler.layernorm.weight": "fc_norm.weight",
             "pooler.layernorm.bias": "fc_norm.bias", "classifier.weight": "head.weight", "classifier.bias": "head.bias",
             "encoder.relative_position_bias.relative_position_bias_table": "shared"}[key]] = value
    depth = 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks."))
    for i in range(depth):
        q, k, v = (hf[f"beit.encoder.layer.{i}.attention.attention.{p}.weight"] for p in ("query", "key", "value"))
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        if "shared" in out:
            out[f"blocks.{i}.attn.relative_position_bias_table"] = out["shared"]
    out.pop("shared", None)
    return out


@pytest.mark.parametrize("name,form", [("per_block_mean_pooling", "model.safetensors"),
                                       ("per_block_mean_pooling", "pytorch_model.bin"),
                                       ("shared_bias_cls_token", "model.safetensors")])
def test_hugging_face_forms_give_transformers_logits(name, form, tmp_path, capsys):
    hf, transformers_logits = hf_fixture(name)
    folder = tmp_path / "beit-hf"
    folder.mkdir()
    if form == "model.safetensors":
        from safetensors.torch import save_file
        save_file(hf, str(folder / form), metadata={"format": "pt"})
    else:
        torch.save(hf, folder / form)  # what save_pretrained(safe_serialization=False) wrote before transformers 5
    (folder / "config.json").write_text("{}")
    logits, line = export_logits(folder, tmp_path, capsys)  # the downloaded folder, as users have it
    assert f"Hugging Face transformers BeitForImageClassification ({form}" in line
    errors = onnx_models.output_errors(logits, transformers_logits)
    assert errors["max_rel"] < 2e-5 and (logits.argmax(1) == transformers_logits.argmax(1)).all(), errors
    # The unilm form of the same weights: the same tensors under the same names, so the same export.
    mapped, expected = checkpoints.read_checkpoint(folder).state_dict, unilm_from_hf(hf)
    assert mapped.keys() == expected.keys() and all(torch.equal(mapped[k], expected[k]) for k in expected)
    if name == "shared_bias_cls_token":
        assert "shared relative position bias copied into each of the 2 blocks" in line


def test_transformers5_module_names_are_read(tmp_path):
    """torch.save(model.state_dict()) under transformers >= 5 writes its new module names: the same weights."""
    hf, _ = hf_fixture("per_block_mean_pooling")
    renames = [("encoder.layer.", "layers."), ("attention.attention.query", "attention.q_proj"),
               ("attention.attention.key", "attention.k_proj"), ("attention.attention.value", "attention.v_proj"),
               ("attention.output.dense", "attention.o_proj"), ("intermediate.dense", "mlp.fc1"),
               ("output.dense", "mlp.fc2"), ("attention.attention.relative_position_bias", "relative_position_bias")]
    renamed = {}
    for key, value in hf.items():
        for old, new in renames:
            key = key.replace(old, new)
        renamed[key] = value
    torch.save(renamed, tmp_path / "v5.bin")
    torch.save(hf, tmp_path / "legacy.bin")
    new, legacy = (checkpoints.read_checkpoint(tmp_path / n).state_dict for n in ("v5.bin", "legacy.bin"))
    assert new.keys() == legacy.keys()
    assert all(torch.equal(new[k], legacy[k]) for k in new)


@pytest.mark.parametrize("obj,flags,message", [
    ({"model": {"blocks.0.w": torch.zeros(1)}}, ["--weights", "ema"], "--weights ema: no EMA weights in it (its keys: model"),
    ({"model_ema": {"blocks.0.w": torch.zeros(1)}}, ["--weights", "model"],
     "--weights model: no model weights in it (its keys: model_ema; it holds only EMA weights: --weights ema)"),
    ({"blocks.0.w": torch.zeros(1)}, ["--weights", "ema"], "a bare state dict holds one set of weights, no EMA"),
    ({"model": {"beit.encoder.layer.0.attention.attention.novel.weight": torch.zeros(1)}}, [],
     "a Hugging Face BEiT key this pipeline does not know: encoder.layer.0.attention.attention.novel.weight"),
])
def test_refusals_name_the_missing_piece(obj, flags, message, tmp_path, capsys):
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    rc = beit_pth2onnx.main(["--source", str(path), "--target", str(tmp_path / "m.onnx"), *flags])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {path}: ") and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_other_pickled_objects_are_named_and_never_run(tmp_path, capsys):
    """Only argparse.Namespace is allowed: a pathlib object in the args is refused, named, not constructed."""
    import pathlib
    path = tmp_path / "ckpt.pth"
    torch.save({"model": beit_model.random_checkpoint(TINY, seed=1)["model"],
                "args": argparse.Namespace(output_dir=pathlib.PurePosixPath("/out"))}, path)
    rc = beit_pth2onnx.main(["--source", str(path), "--target", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "refused: the file holds Python objects other than tensors" in err
    assert "(pathlib.PurePosixPath)" in err and err.count("\n") == 1


def test_hugging_face_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    rc = beit_pth2onnx.main(["--source", str(tmp_path), "--target", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert rc == 1 and "a folder without model.safetensors or pytorch_model.bin" in err
