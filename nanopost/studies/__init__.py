"""The studies and benchmarks built on the nanopost library: each module here is a command (python -m
nanopost.studies.NAME) and its .md holds what it measured. The library never imports them."""
