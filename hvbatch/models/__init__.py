"""Models: the family registry (`family.py`), family-neutral building blocks, and one folder per family.

Nothing here imports torch.distributed, and importing this package imports nothing else: the
control plane reads `hvbatch.models.family` without torch. The neutral blocks (`layers`, `refiner`,
`attention`, `attention_backends`, `fp8`, `state_dict_check`, `runtime`, `vae_tiling`, `geometry`,
`protocols`, `encoding`) serve every family; a family's own code lives in `hvbatch/models/<family>/`.
"""
