"""``python -m fedsim ...``: the same command line as the ``fedsim`` script (`fedsim.cli`)."""

from fedsim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
