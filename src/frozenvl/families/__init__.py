"""Family registry: adding a family is one file and one line here."""

from __future__ import annotations

from ..config import ConfigError
from .adaption_prompt import AdaptionPromptFamily
from .base import IMAGE_TOKEN_ID, DecodeContext, Family
from .bind import BindFamily
from .cross_attention import CrossAttentionFamily
from .inner_adaptor import InnerAdaptorFamily
from .prefix import PrefixFamily
from .visual_experts import VisualExpertsFamily
from .wings import WingsFamily

FAMILIES: dict[str, type[Family]] = {
    PrefixFamily.name: PrefixFamily,
    InnerAdaptorFamily.name: InnerAdaptorFamily,
    AdaptionPromptFamily.name: AdaptionPromptFamily,
    BindFamily.name: BindFamily,
    CrossAttentionFamily.name: CrossAttentionFamily,
    VisualExpertsFamily.name: VisualExpertsFamily,
    WingsFamily.name: WingsFamily,
}


def get_family(name: str) -> type[Family]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"unknown family {name!r}; available families: {sorted(FAMILIES)}") from None


__all__ = ["FAMILIES", "IMAGE_TOKEN_ID", "DecodeContext", "Family", "get_family"]
