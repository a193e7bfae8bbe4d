"""User-facing errors: each prints as one line (no traceback) and exits non-zero."""


class XMCError(Exception):
    """An error caused by the user's input (files, config); reported as one clear line."""


class DataFormatError(XMCError):
    """A malformed data file: names the file and the 1-based line number."""

    def __init__(self, path, line, msg):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {msg}")


class MissingFileError(XMCError):
    """A required data or model file is not where the config says."""


class ConfigError(XMCError):
    """A bad config value: names the key."""

    def __init__(self, key, msg):
        self.key = key
        super().__init__(f"config key '{key}': {msg}")
