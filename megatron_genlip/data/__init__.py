"""The data path: tokenizer, images, indexed datasets, packing, loaders. It builds batches in the format of
``megatron_genlip.batch`` and imports no model code (tests/test_layering.py)."""
