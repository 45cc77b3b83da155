"""specvlm_hf: lossless EAGLE-style tree speculative decoding for vision-language models in Hugging Face generate().

Importing the package registers the draft and the compressor (`SpecVLMDraftModel`, `SpecVLMCompressor`) with the
Auto classes and routes `target.generate(..., assistant_model=draft)` to the tree loop for specvlm_hf drafts (other
assistants unchanged).
"""

from transformers import AutoConfig, AutoModel

from . import integration
from .adapters import SUPPORTED_MODEL_TYPES
from .compressor import SpecVLMCompressor, SpecVLMCompressorConfig
from .configuration import SpeculativeConfig, SpecVLMDraftConfig, SpecVLMEagle3DraftConfig
from .drafter import Drafter, DraftSource, DraftState, TreeDrafter
from .generation import SpeculativeDecoderOutput, SpeculativeOutput, speculative_generate
from .metrics import SpeculativeStats
from .modeling_draft import SpecVLMDraftModel
from .modeling_eagle3 import SpecVLMEagle3DraftModel
from .tree import DraftTree
from .verify import Acceptance

__version__ = "0.1.0"

AutoConfig.register(SpecVLMDraftConfig.model_type, SpecVLMDraftConfig, exist_ok=True)
AutoModel.register(SpecVLMDraftConfig, SpecVLMDraftModel, exist_ok=True)
AutoConfig.register(SpecVLMEagle3DraftConfig.model_type, SpecVLMEagle3DraftConfig, exist_ok=True)
AutoModel.register(SpecVLMEagle3DraftConfig, SpecVLMEagle3DraftModel, exist_ok=True)
AutoConfig.register(SpecVLMCompressorConfig.model_type, SpecVLMCompressorConfig, exist_ok=True)
AutoModel.register(SpecVLMCompressorConfig, SpecVLMCompressor, exist_ok=True)
integration.install()

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Acceptance",
    "DraftSource",
    "DraftState",
    "DraftTree",
    "Drafter",
    "SpecVLMCompressor",
    "SpecVLMCompressorConfig",
    "SpecVLMDraftConfig",
    "SpecVLMDraftModel",
    "SpecVLMEagle3DraftConfig",
    "SpecVLMEagle3DraftModel",
    "SpeculativeConfig",
    "SpeculativeDecoderOutput",
    "SpeculativeOutput",
    "SpeculativeStats",
    "TreeDrafter",
    "speculative_generate",
]
