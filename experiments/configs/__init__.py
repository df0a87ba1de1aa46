"""Experiment configs: ``base.py`` holds the shared CPU-scale base; every other file is one experiment, a small
dict of arm diffs over that base (see base.py and experiments/sweep.py)."""
