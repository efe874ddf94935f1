"""lgnet: lguest's inter-guest networking (Linux 2.6.23), rebuilt as a multi-process simulator."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lgnet")
except PackageNotFoundError:        # running from a source tree that was never installed
    __version__ = "0+unknown"
