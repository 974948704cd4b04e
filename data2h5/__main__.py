"""``python -m data2h5``: the same as the ``data2h5`` command."""
from .cli import main

main()
