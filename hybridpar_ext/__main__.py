import os
import sys

from .cli import main

code = main()
if "RANK" in os.environ and sys.argv[1:2] == ["train"]:
    # A training rank under torchrun: its gloo threads may still be letting go of the last
    # collective, so it leaves without interpreter finalization (see parallel/shutdown.py).
    from .parallel.shutdown import exit_process
    exit_process(code)
sys.exit(code)
