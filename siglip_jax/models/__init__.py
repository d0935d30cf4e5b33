"""Image and text towers and the SigLIP two-tower model."""
