"""Fixtures shared by the test modules: checkpoints, one tiny-model/ONNX set, scripts (pytest.ini puts the repo
and tests/ on sys.path).

Test modules use these as fixtures (never ``from conftest import``; plain helpers are in helpers.py):
``tiny_checkpoint``, ``base_checkpoint``, ``tiny_model`` and ``onnx_exports`` (exported, static and
onnxsim-simplified ONNX files of any kind, opset and batch size, made once per session).
"""


import pytest
from helpers import BASE, TINY

from beit_pipeline.graph import simplify
from beit_pipeline.model import build as beit_model
from beit_pipeline.model import export as beit_export


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A randomly initialised tiny BEiT checkpoint in the unilm format."""
    path = tmp_path_factory.mktemp("ckpt") / "beit_tiny.pth"
    beit_model.save_random_checkpoint(path, TINY, seed=1)
    return str(path)


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """A randomly initialised beit_base_patch16_224 checkpoint in the unilm format (~350 MB)."""
    path = tmp_path_factory.mktemp("ckpt_base") / "beit_base_patch16_224_pt22k_ft22kto1k.pth"
    beit_model.save_random_checkpoint(path, BASE, seed=2)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint as a timm module in eval mode."""
    model, _, name = beit_model.build_model(beit_model.load_state_dict(tiny_checkpoint))
    assert name == TINY
    return model


class OnnxModels:
    """ONNX files of the test models, made on first use and kept for the session.

    ``kind`` is "tiny" or "base" (the session checkpoints) or a name registered with
    ``register(kind, make_torch_model)``.  ``dynamic(kind, opset)``: the export with a
    dynamic batch axis, as beit_pth2onnx.py writes it; ``static(kind, opset, bs)``: exported
    with a fixed batch; ``simplified(kind, opset, bs)``: the dynamic export through onnxsim
    with the batch fixed (checked by simplify.simplify_checked, as run_all.sh's onnx_check step does); BEiT-base
    through beit_pipeline.graph.simplify, onnxsim's graph byte for byte in 4 s instead of 85 s (test_onnx_files.py's
    test_the_held_out_simplifier_makes_onnxsims_graph_byte_for_byte; test_pth2onnx.py's base test runs onnxsim).
    """

    CHECKPOINTS = {"tiny": "tiny_checkpoint", "base": "base_checkpoint"}

    def __init__(self, folder, request):
        self.folder, self.request = folder, request
        self.makers, self.files, self.torch = {}, {}, {}

    def register(self, kind, make_torch_model):
        self.makers.setdefault(kind, make_torch_model)

    def torch_model(self, kind):
        if kind not in self.torch:
            if kind in self.CHECKPOINTS:
                checkpoint = self.request.getfixturevalue(self.CHECKPOINTS[kind])
                self.torch[kind] = beit_model.build_model(beit_model.load_state_dict(checkpoint))[0]
            else:
                self.torch[kind] = self.makers[kind]()
        return self.torch[kind]

    def _made(self, key, make):
        if key not in self.files:
            path = str(self.folder / ("_".join(map(str, key)) + ".onnx"))
            make(path)
            self.files[key] = path
        return self.files[key]

    def dynamic(self, kind="tiny", opset=11):
        return self._made((kind, "dyn", opset), lambda path: beit_export.export(
            self.torch_model(kind), path, batch_size=1, img_size=224, opset=opset, dynamic=True))

    def static(self, kind="tiny", opset=11, batch_size=1):
        return self._made((kind, "static", opset, batch_size), lambda path: beit_export.export(
            self.torch_model(kind), path, batch_size=batch_size, img_size=224, opset=opset, dynamic=False))

    def simplified(self, kind="tiny", opset=11, batch_size=1):

        def make(path):
            module = "beit_pipeline.graph.simplify" if kind == "base" else "onnxsim"
            errors = simplify.simplify_checked(self.dynamic(kind, opset), path, batch_size, module=module)  # raises if not kept
            assert errors["shape"] == (batch_size, 3, 224, 224)
        return self._made((kind, "sim", opset, batch_size), make)


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory, request):
    return OnnxModels(tmp_path_factory.mktemp("onnx_models"), request)
