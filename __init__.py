"""Dimple, the discrete-diffusion multimodal LLM, native on transformers 5.x.

Importing the package registers Dimple with transformers' Auto classes, so `AutoModel.from_pretrained(folder)`
works for pip users without `trust_remote_code`; the same files also ship as the Hub repo's remote code.
"""

import transformers
from transformers import AutoConfig, AutoProcessor, AutoTokenizer
# The top-level name is a placeholder on some 5.x releases when torchvision is missing; the module has the class.
from transformers.models.auto.image_processing_auto import AutoImageProcessor

from .cache_dimple import DimpleDiffusionCache
from .configuration_dimple import DimpleConfig, DimpleVisionConfig
from .generation_config_dimple import DimpleGenerationConfig
from .generation_utils import DimpleGenerationOutput
from .image_processing_dimple import DimpleImageProcessor
from .modeling_dimple import MODEL_AUTO_CLASSES, DimpleModel, DimpleModelOutput, DimplePreTrainedModel
from .processing_dimple import DimpleProcessor
from .tokenization_dimple import DimpleTokenizer


AutoConfig.register(DimpleConfig.model_type, DimpleConfig, exist_ok=True)
for auto_class_name in MODEL_AUTO_CLASSES:
    getattr(transformers, auto_class_name).register(DimpleConfig, DimpleModel, exist_ok=True)
AutoImageProcessor.register(DimpleConfig, image_processor_classes={"pil": DimpleImageProcessor}, exist_ok=True)
AutoProcessor.register(DimpleConfig, DimpleProcessor, exist_ok=True)
AutoTokenizer.register(DimpleConfig, tokenizer_class=DimpleTokenizer, exist_ok=True)

__all__ = [
    "DimpleConfig",
    "DimpleDiffusionCache",
    "DimpleVisionConfig",
    "DimpleGenerationConfig",
    "DimpleGenerationOutput",
    "DimpleImageProcessor",
    "DimpleModel",
    "DimpleModelOutput",
    "DimplePreTrainedModel",
    "DimpleProcessor",
    "DimpleTokenizer",
]
