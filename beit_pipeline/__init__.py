"""The BEiT offline-inference pipeline's library; the guide's scripts at the top level are thin over it.

Modules are named for what they hold; README's "How the code is laid out" lists them, with where to add a
new stage or a new graph pattern (one list, not two that drift apart).
"""
