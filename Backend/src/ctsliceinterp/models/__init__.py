"""The networks: the slice VAE and the latent U-Net, and their configurations."""
