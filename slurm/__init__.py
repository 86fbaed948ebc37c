# marks slurm/ as the hvbatch.slurm_templates package so the sbatch templates ship with the wheel
