"""expertd: serve Python experts from a prefork worker daemon over a Unix socket.

Importing the package stays cheap (standard library only): clients import
``expertd.client``, expert modules import :func:`expert`.
"""

from expertd.expert import expert

__version__ = "0.1.0"
__all__ = ["__version__", "expert"]
