"""``python -m headlens ...`` (and ``torchrun --nproc-per-node N -m headlens scan ...``): the command line."""
from .cli import main

main()
