"""Flax models used by the experiments (the user's side: jlora never imports these)."""
