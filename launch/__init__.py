"""Launching training on SLURM (submitit or sbatch templates) and reading a run's state.

This package knows nothing about models: it starts a training entry point by module path
(`seer_pipeline.train.cli:main` by default) in every task and leaves preemption handling to the
trainer, which saves collectively and requeues itself.
"""
