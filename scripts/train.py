#!/usr/bin/env python
"""Train one run of the study. Examples (the seed's commands):

    python scripts/train.py --strategy data_parallel --model_size 1B
    python scripts/train.py --strategy pipeline_parallel --stages 2
    python scripts/train.py --strategy hybrid_parallel --nodes 2 --gpus_per_node 1

Starts its own torchrun workers unless already launched by torchrun or srun. See llmpar.run_cli
and llmpar.launch.
"""

import sys

from llmpar.run_cli import main

if __name__ == "__main__":
    sys.exit(main())
