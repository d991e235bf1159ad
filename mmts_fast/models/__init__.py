"""Model classes, one file per paper, and the registry used by the CLI and ``from_pretrained``."""
from mmts_fast.models.base import ForecastModel
from mmts_fast.models.lemole import LeMoLE, LeMoLEConfig
from mmts_fast.models.llm_ts_net import LLMTSNet, LLMTSNetConfig
from mmts_fast.models.mola import MoLA, MoLAConfig
from mmts_fast.models.mome import MoME, MoMEConfig
from mmts_fast.models.time_llama import TimeLlaMA, TimeLlaMAConfig
from mmts_fast.models.mole import (DLinearMoLE, DLinearMoLEConfig, MoLEConfig, RLinearMoLE, RLinearMoLEConfig,
                                   RMLPMoLE, RMLPMoLEConfig)

MODELS = {cls.model_type: cls for cls in (DLinearMoLE, RLinearMoLE, RMLPMoLE, LeMoLE, MoME, MoLA, LLMTSNet, TimeLlaMA)}


def get_model_class(name: str) -> type:
    """The model class registered as ``name`` (e.g. ``"rlinear_mole"``), or a ValueError listing them."""
    key = name.strip().lower().replace("-", "_")
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[key]


__all__ = ["DLinearMoLE", "DLinearMoLEConfig", "ForecastModel", "LLMTSNet", "LLMTSNetConfig", "LeMoLE", "LeMoLEConfig", "MODELS", "MoLEConfig",
           "MoLA", "MoLAConfig", "MoME", "MoMEConfig", "RLinearMoLE",
           "RLinearMoLEConfig", "RMLPMoLE", "RMLPMoLEConfig", "TimeLlaMA", "TimeLlaMAConfig", "get_model_class"]
