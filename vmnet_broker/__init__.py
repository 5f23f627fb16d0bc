"""vmnet-broker: one shared service that owns virtual networks for VM launchers.

In a launcher::

    import vmnet_broker

    with vmnet_broker.Client() as client:
        network = client.acquire_network("shared")
        iface = client.attach("shared", kind="tap")
        # hand iface.fds to the VMM; the network lives while `client` is open

Or, for the one-liner case, ``vmnet_broker.acquire_network("shared")`` on a
process-wide connection that lives as long as the process.
"""

from ._version import __version__
from .client import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    BrokerStatus,
    Client,
    Interface,
    Network,
    NetworkStatus,
    acquire_network,
)
from .errors import (
    BrokerError,
    Code,
    ConnectionFailed,
    CreateFailed,
    InternalError,
    InvalidReply,
    InvalidRequest,
    NotAllowed,
    NotFound,
    strerror,
)

__all__ = [
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "BrokerError",
    "BrokerStatus",
    "Client",
    "Code",
    "ConnectionFailed",
    "CreateFailed",
    "Interface",
    "InternalError",
    "InvalidReply",
    "InvalidRequest",
    "Network",
    "NetworkStatus",
    "NotAllowed",
    "NotFound",
    "__version__",
    "acquire_network",
    "strerror",
]
