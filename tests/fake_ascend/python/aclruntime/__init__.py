"""Stand-in for CANN's aclruntime wheel: present, so that run_all.sh's check that it imports passes.

The real ais_bench package's __init__.py is empty and imports nothing; its inference imports aclruntime
(ais_bench/infer/interface.py: ``import aclruntime``), which is what run_all.sh checks up front.
"""
