"""The HunyuanVideo-1.5 family (transformer, VAE, encoders, variants)."""
