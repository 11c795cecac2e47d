"""``python -m kdkit``: the kdkit command line."""

from kdkit.cli import entrypoint

if __name__ == "__main__":
    entrypoint()
