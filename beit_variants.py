"""TRANSITION SHIM, to be deleted: use beit_pipeline.variants."""
from beit_pipeline.variants import *  # noqa: F401,F403
