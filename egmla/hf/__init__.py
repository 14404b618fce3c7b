"""Hugging Face integration: transformers config/model classes, export, lm-evaluation-harness adapter.

Importing this package registers model_type "egmla" with AutoConfig and AutoModelForCausalLM, so
`AutoModelForCausalLM.from_pretrained(DIR)` loads an exported egmla model without trust_remote_code.
Needs the `hf` extra (transformers). The lm-eval adapter (egmla.hf.lm_eval_model) is imported on its
own, as it needs the `eval` extra.
"""
try:
    from transformers import AutoConfig, AutoModelForCausalLM
except ModuleNotFoundError as err:  # egmla.hf.export and the lm-eval adapter import through this package
    if err.name != "transformers":
        raise
    _MISSING = err
else:
    _MISSING = None
    from egmla.hf.cache import EgmlaCache
    from egmla.hf.configuration_egmla import EgmlaConfig
    from egmla.hf.modeling_egmla import EgmlaForCausalLM, EgmlaPreTrainedModel

    AutoConfig.register(EgmlaConfig.model_type, EgmlaConfig, exist_ok=True)
    AutoModelForCausalLM.register(EgmlaConfig, EgmlaForCausalLM, exist_ok=True)

    __all__ = ["EgmlaCache", "EgmlaConfig", "EgmlaForCausalLM", "EgmlaPreTrainedModel"]


def require_transformers() -> None:
    """Raise a ValueError with the install command when transformers is missing."""
    if _MISSING is not None:
        raise ValueError("this needs the transformers library: pip install 'egmla[hf]'")
