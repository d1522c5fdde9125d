"""seer_pipeline: SEER (SwAV + RegNetY) pretraining from raw image dumps to SLURM runs.

Kept import-light on purpose: `seer-shards` imports helpers from here and must not pay
for importing torch.
"""
__version__ = "0.1.0"
