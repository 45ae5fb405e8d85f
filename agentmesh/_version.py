"""The version of the installed distribution, `agentmesh-streams`.

pyproject.toml's `[project] version` is the one place the version is written; this module reads
it back from the installed metadata, so `mesh --version` and the wheel never disagree.
"""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["DISTRIBUTION", "__version__"]

#: The distribution name on PyPI (the import name stays `agentmesh`).
DISTRIBUTION = "agentmesh-streams"

try:
    __version__: str = version(DISTRIBUTION)
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0.0.0+unknown"
