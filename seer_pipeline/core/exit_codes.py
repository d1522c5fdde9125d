"""Exit codes shared by the trainer and the processes that watch it (launcher, demo).

Torch-free on purpose: `seer-status`, the submitit callable and the demo driver read these
without importing torch.
"""

# A rank that saved a checkpoint because of a signal and stopped. 75 is EX_TEMPFAIL in
# sysexits.h ("try again later"): re-running the same command resumes the run.
PREEMPTED = 75
# Bad usage, config or input, reported in one line before any work: argparse's own code for a
# bad command line, so every CLI of the project means the same by it.
USAGE = 2
# Stopped by Ctrl-C (a second SIGINT, or one before training started): 128 + SIGINT, what a
# shell reports for a process killed by the signal, so scripts read it the same way.
INTERRUPTED = 130
