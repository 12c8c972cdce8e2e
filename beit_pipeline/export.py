"""ONNX export of a timm BEiT with the TorchScript exporter (opset 11 for the guide's atc)."""

import warnings

INPUT_NAME, OUTPUT_NAME = "image", "class"


def export(model, path, batch_size, img_size, opset, dynamic):
    """Write ``model`` to ``path`` with the TorchScript exporter."""
    import torch

    dummy = torch.zeros(batch_size, 3, img_size, img_size)
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (opset 11 for atc); timm's image-size
        # assert traces to a constant, which is right because H and W are fixed.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        with torch.no_grad():
            torch.onnx.export(model, (dummy,), path, dynamo=False, export_params=True, opset_version=opset,
                              do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes)
