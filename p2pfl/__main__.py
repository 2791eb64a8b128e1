"""Console entry point: python -m p2pfl."""

from p2pfl.cli import main

main()
