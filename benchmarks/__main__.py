"""`python -m benchmarks [--quick] [--json FILE] [--only NAME ...] [--gpu]`: see benchmarks/suite.py."""

from benchmarks.suite import main

if __name__ == "__main__":
    main()
