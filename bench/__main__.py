"""Entry point: `python -m bench run --out bench/results [--quick]`."""
from bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
