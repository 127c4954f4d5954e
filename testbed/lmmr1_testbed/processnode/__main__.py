"""Entry point: `python -m lmmr1_testbed.processnode --help`."""

from lmmr1_testbed.processnode.agent import main

main()
