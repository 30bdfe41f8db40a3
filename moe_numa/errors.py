"""The exception hierarchy. Every error a user can cause is a MoeNumaError whose
message names the offending file, tensor, key, field, expert or node."""


class MoeNumaError(Exception):
    """Base class of all moe_numa errors."""


class GGUFError(MoeNumaError, ValueError):
    """A GGUF file is malformed, truncated or inconsistent."""


class UnsupportedError(MoeNumaError, ValueError):
    """An architecture, tensor, quant type or tokenizer we do not support."""


class ShapeError(MoeNumaError, ValueError):
    """Arrays or tensors whose shapes, dtypes or layout do not fit."""


class ChatTemplateError(MoeNumaError, ValueError):
    """A chat template that is missing, malformed or fails to render."""


class ExpertMapError(MoeNumaError, ValueError):
    """An expert map that is invalid or does not match the model."""


class TopologyError(MoeNumaError, ValueError):
    """A NUMA topology request the machine cannot satisfy."""


class ContextOverflowError(MoeNumaError, ValueError):
    """A prompt or generation that does not fit in the context window."""


class QueueFullError(MoeNumaError):
    """The server has no free slot and its request queue is full (HTTP 429)."""


class ClosedError(MoeNumaError, RuntimeError):
    """A model, engine or thread pool used after close()."""


class ArgumentError(MoeNumaError, ValueError):
    """An API argument of the wrong type or out of range (token ids, n_ctx, sampling parameters)."""
