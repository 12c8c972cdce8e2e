"""TRANSITION SHIM, to be deleted: use beit_pipeline.synthetic."""
from beit_pipeline.synthetic import *  # noqa: F401,F403
