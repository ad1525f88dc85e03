"""``python -m bsbr``: the ``bsbr`` command."""
from .cli import run

if __name__ == "__main__":
    run()
