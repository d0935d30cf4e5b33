"""Training objectives added to the sigmoid loss (SigLIP 2 recipe); the registry is registry.py."""
