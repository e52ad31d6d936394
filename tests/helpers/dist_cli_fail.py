"""A torchrun entry point for tests/experiments/test_distributed_cli.py (not collected: no test_ prefix).

    torchrun --nproc_per_node=2 ... tests/helpers/dist_cli_fail.py train ...    (the `llama-fast` arguments)

`llama-fast train` exactly as `-m llama_fast` runs it, except that rank LF_FAIL_RANK raises in
its meta-training step at iteration LF_FAIL_AT (after earlier steps have synchronised), so the
test sees how a rank failing mid-run ends the job.
"""

import os
import sys

from llama_fast.experiments import cli, training

FAIL_RANK, FAIL_AT = int(os.environ["LF_FAIL_RANK"]), int(os.environ["LF_FAIL_AT"])
_step = training.Trainer.step


def failing_step(trainer):
    if trainer.ctx.rank == FAIL_RANK and trainer.iteration == FAIL_AT:
        raise RuntimeError(f"injected failure on rank {FAIL_RANK} at iteration {FAIL_AT}")
    return _step(trainer)


training.Trainer.step = failing_step

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
