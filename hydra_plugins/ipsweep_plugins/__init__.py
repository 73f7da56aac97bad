"""ipsweep's Hydra plugins: the sweeper (pre-flight checks, manifest, dry run) and two submitit launchers.

Hydra finds plugins in the `hydra_plugins` namespace package; this folder sits beside launch.py so a
clone works without installing it.
"""
