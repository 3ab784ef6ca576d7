"""MoE layer fwd+bwd time relative to a dense FFN with the same active FLOPs; see --help."""

import sys

from moekit.benchmark import main

if __name__ == "__main__":
    main(sys.argv[1:])
