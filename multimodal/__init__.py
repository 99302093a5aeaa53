"""Multimodal recipes: text-to-image latent diffusion (t2i_data -> t2i_vae -> t2i_train) and NeRF
(nerf_data -> nerf_train), stages under the pipeline's stage contract; see multimodal.stages and
`aigc t2i --help` / `aigc nerf --help` (multimodal.cli)."""
