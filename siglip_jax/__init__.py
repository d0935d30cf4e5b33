"""siglip_jax: train and evaluate SigLIP image-text models with JAX/Flax."""

__version__ = "0.1.0"
