"""hpc_llm: a GPT-2 trainer with explicit forward/backward and explicit MPI collectives."""

__version__ = "0.1.0"

from hpc_llm.api import load_model, load_tokenizer  # noqa: E402  (the notebook API)
from hpc_llm.tools.hf_export import export_hf  # noqa: E402

__all__ = ["export_hf", "load_model", "load_tokenizer", "__version__"]
