"""HunyuanVideo-1.5 (8.3B, 2025-11): transformer, conditioning and checkpoint loaders.

The family registration (`family.py`) is written at integration time.
"""
