"""``python -m tests.service.fault_server ARGS``: ``python -m service ARGS`` with the
fault-injecting embedder of ``tests/service/faults.py`` (tests only)."""

import sys

from service.__main__ import main

if __name__ == "__main__":
    main(sys.argv[1:], embedder_factory="tests.service.faults:load")
