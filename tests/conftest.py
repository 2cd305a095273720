"""Shared test fixtures: tiny model configs, the real tokenizers and small packed batches."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from megatron_genlip import platform
from megatron_genlip.config import ModelConfig

torch.set_num_threads(1)
platform.start_process()  # as every entry point does (CPU: no inductor import behind megatron-core's decorators)
platform.initialize()  # the process start of the test session: the platform decision and the library patches


# The test files that take longest (launcher runs, SLURM jobs, an install), slowest first. The README's test command
# runs the suite on two pytest-xdist workers, one test file at a time each (`--dist loadfile`, set in pyproject.toml,
# so module fixtures such as a trained model are built once): starting the long files first keeps both workers busy
# to the end instead of leaving one of them alone with the slowest file. Files not listed follow in collection order.
SLOWEST_FIRST = ("test_trainer.py", "test_checkpoint_integrity.py", "test_slurm.py", "test_pipeline_parallel.py",
                 "test_hf_export.py", "test_reshard.py", "test_offline_install.py", "test_sequence_parallel.py",
                 "test_gpu_run.py", "test_tensor_parallel.py", "test_data.py", "test_run_reports.py")


def pytest_collection_modifyitems(config, items):
    order = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: a file's tests keep their order


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: tests that start the launcher, SLURM, a preprocessing or training "
                            "subprocess or an install (seconds to minutes each); -m 'not slow' is the ~1-minute tier")


def small_model_config(**kw) -> ModelConfig:
    """A small model with in_proj/proj present (text_embed_dim != hidden) and the Qwen vocabulary size."""
    base = dict(num_layers=2, hidden_size=48, ffn_hidden_size=128, num_attention_heads=4, text_embed_dim=40,
                vocab_size=151936, mrope_section=[1, 2, 1], drop_path_rate=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small embedded-style dataset: 400 train and 40 held-out synthetic samples, indexed (one per test module;
    modules that need another size define their own ``data``)."""
    from trainer_harness import build_test_dataset

    return build_test_dataset(tmp_path_factory.mktemp("trainer-data"), 400, 40)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from megatron_genlip.data.tokenizer import load_qwen_tokenizer

    return load_qwen_tokenizer()


def random_image(grid: tuple[int, int], seed: int, patch: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(grid[0] * grid[1], 3, patch, patch, generator=g) * 2 - 1
