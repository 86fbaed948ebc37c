"""HunyuanVideo-I2V (2025-03), the 1.0 image-to-video model: what this folder holds so far is its
image sizing (`sizing.py`); the model itself (token_replace, the LLaVA image tokens) comes later and
may join the 1.0 family folder as a flavour.
"""
