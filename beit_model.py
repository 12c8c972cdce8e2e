"""TRANSITION SHIM, to be deleted: use beit_pipeline.model."""
from beit_pipeline.model import *  # noqa: F401,F403
