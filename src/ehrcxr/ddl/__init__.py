"""DDL-CXR's generative stages (Yao et al., NeurIPS 2024; Chenliu-svg/DDL-CXR): a KL autoencoder with a CheXpert
head on its latent (``autoencoder``), a latent diffusion model conditioned on the previous X-ray's latent and the EHR
in between (``diffusion``), and DDIM generation of the latent at prediction time (``generation``). The prediction
model that fuses the generated latent is ``ehrcxr.models.ddl_cxr``."""
