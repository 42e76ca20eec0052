"""`python -m loopstream.cli` runs the command line."""
from loopstream.cli.app import main

main()
