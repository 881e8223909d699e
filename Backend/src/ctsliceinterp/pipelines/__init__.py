"""Inference pipelines built on the models: latent diffusion (``Interpolator``) and checkpoints."""
