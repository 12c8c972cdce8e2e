"""Stand-in for the ais_bench package (``python3 -m ais_bench``); see tests/fake_ascend/README.md."""
