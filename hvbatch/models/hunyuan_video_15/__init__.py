"""HunyuanVideo-1.5 (8.3B, 2025-11): transformer, conditioning, VAE, text encoders, variants and loaders.

The family registration (`family.py`) is written at integration time.
"""
