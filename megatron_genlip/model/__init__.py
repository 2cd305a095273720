"""The GenLIP model, written for one device; parallelism enters through the layer spec, the sequence-parallel
wrapper and the pipeline stages. It reads batches in the format of ``megatron_genlip.batch``, builds on
``megatron_genlip.parallel`` and imports no data code (tests/test_layering.py)."""
