"""expertd: serve Python experts from a prefork worker daemon over a Unix socket.

Importing the package stays cheap (standard library only): clients import
``expertd.client``, expert modules import :func:`expert` and :class:`Model`.
"""

from expertd.expert import expert

__version__ = "0.1.0"
__all__ = ["Model", "__version__", "expert"]


def __getattr__(name: str) -> object:
    if name == "Model":  # imported on first use: clients never pay for it
        from expertd.model import Model

        return Model
    raise AttributeError(f"module 'expertd' has no attribute {name!r}")
