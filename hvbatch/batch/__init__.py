"""Batch generation: a Parquet file of prompts in, one mp4 and one manifest row per video out.

From the top: `control/` runs on the login node (prompts, shards, the commands), `executors/`
adapts local processes, submitit's Slurm jobs and plain sbatch scripts to one interface,
`runtime/` runs inside a job (the shard runner), `ledger.py` is the one writer of an attempt's
life, `rundir.py` the layout of the run directory, `attempt.py` the values they all speak in.
"""
