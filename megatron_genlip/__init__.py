"""megatron-genlip: a tensor/pipeline-parallel trainer for GenLIP vision encoders."""

import warnings as _warnings

# megatron-core warns at import that Apex/Transformer Engine are absent; that is the expected CPU setup.
_warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
_warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# DeepSpeed's ZeRO still calls the deprecated all_gather_into_tensor; nothing for a user to act on.
_warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated.*")

__version__ = "0.1.0"
