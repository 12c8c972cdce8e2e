"""Step 1, images -> float32 NCHW ``.bin`` batches, bit-exact to torchvision's transforms.

``transform`` decodes, resizes and crops one image as torchvision does; ``workers`` decodes in worker
processes straight into shared batch buffers; ``runner`` plans and runs a whole folder (resume, locks,
the manifest); ``batches`` is the batch files' and manifest's format, read by every later step.
"""
