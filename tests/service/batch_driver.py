"""``python -m tests.service.batch_driver ARGS``: ``python -m service.batch ARGS`` whose model
actors hold in the middle of a block (``tests.service.faults.hold_batch_actor``; tests only)."""

import sys

from service.batch.__main__ import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], embedder_factory="tests.service.faults:hold_batch_actor"))
