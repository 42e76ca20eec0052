"""Model providers behind one normalized interface (see base.py)."""
from .base import (
    ActionMode,
    Message,
    ModelReply,
    Provider,
    ProviderError,
    ToolCall,
    ToolSpec,
)
from .errors import LocalModelError, ProviderConfigError
from .factory import make_provider, open_provider

__all__ = [
    "ActionMode",
    "LocalModelError",
    "Message",
    "ModelReply",
    "Provider",
    "ProviderConfigError",
    "ProviderError",
    "ToolCall",
    "ToolSpec",
    "make_provider",
    "open_provider",
]
