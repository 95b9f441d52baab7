"""``python -m layerswap_fast`` runs the command line."""

from layerswap_fast.cli import main

main(prog_name="layerswap-fast")
