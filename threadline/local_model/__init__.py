"""The bundled local model: a supervised llama.cpp server for `threadline up`.

`catalogue` says which models can be served and where their weights come from,
`server` runs and supervises the server process, and `llama_server` is the
process's entry point (llama-cpp-python's server, loaded safely on AMX CPUs).
Both llama-cpp-python and the weights are the optional `local-model` extra, so
nothing here imports them at module load.
"""

from threadline.local_model.catalogue import (
    GEMMA3_270M,
    INSTALL_HINT,
    LOCAL_MODELS,
    SMOLLM2_135M,
    BundledModel,
)
from threadline.local_model.server import (
    LOCAL_UPSTREAM_NAME,
    LocalModelServer,
    local_model_installed,
)

__all__ = [
    "GEMMA3_270M",
    "INSTALL_HINT",
    "LOCAL_MODELS",
    "LOCAL_UPSTREAM_NAME",
    "SMOLLM2_135M",
    "BundledModel",
    "LocalModelServer",
    "local_model_installed",
]
