#!/usr/bin/env python
"""Python entry of the GenLIP trainer (DeepSpeed). Run it under a launcher:

    deepspeed --num_gpus 2 examples/pretrain_genlip.py --config examples/configs/tiny.yaml
    torchrun --nproc_per_node 8 examples/pretrain_genlip.py --config examples/configs/stage1-So16.yaml

``--help`` lists every flag; ``--dry-run`` checks a config without data or GPUs.
"""

from megatron_genlip.training.entry import run_and_exit

if __name__ == "__main__":
    run_and_exit()  # main(), then exit without the interpreter's slow module teardown
