"""lgnet: lguest's inter-guest networking (Linux 2.6.23), rebuilt as a multi-process simulator."""


def __getattr__(name: str):
    # Looked up lazily: importlib.metadata pulls in email and socket, and importing the
    # sans-IO engine must not import any I/O module.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("lgnet")
        except PackageNotFoundError:        # a source tree that was never installed
            return "0+unknown"
    if name == "up":
        # `with lgnet.up("scenario.yaml") as lab:` (lgnet.lab.up), imported on first use.
        from lgnet.lab import up
        return up
    raise AttributeError(name)
