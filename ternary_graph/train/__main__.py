"""``python -m ternary_graph.train ARGS`` is ``ternary-graph train ARGS`` (the form torchrun launches:
``torchrun --nproc-per-node N -m ternary_graph.train --distributed ...``)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
