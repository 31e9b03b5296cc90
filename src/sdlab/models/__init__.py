"""Networks: U-Net, VAE, CLIP text encoders and tokenizer. Knows nothing about diffusion; imports only `sdlab.utils`."""
