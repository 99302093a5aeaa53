"""Multimodal recipes (text-to-image latent diffusion, NeRF): not built yet, see the README."""
