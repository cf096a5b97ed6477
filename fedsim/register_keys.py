"""Register SuperNode public keys with a SuperLink: ``flwr supernode register`` for each key,
all in one process.

Usage: ``python register_keys.py FEDERATION KEY.pub [KEY.pub ...]``, with ``FLWR_HOME``
naming the connection, as for the ``flwr`` CLI. Prints one line per key; exits 1 at the
first key that fails, after printing Flower's reason.

Why one process: each ``flwr`` call spends seconds of CPU importing Flower before it sends
one request. On a busy 2-core machine, registering 20 keys one ``flwr`` call at a time took
over 4 minutes (measured); here Flower is imported once. It runs as a script by path
(`fedsim.deploy` starts it), so it imports nothing from fedsim, which would pull in torch.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import click
    from flwr.cli.app import app

    federation, keys = argv[0], argv[1:]
    for key in keys:
        print(f"registering {key}", flush=True)
        try:
            code = app(["supernode", "register", key, federation], standalone_mode=False)
        except click.ClickException as exc:
            print(f"failed: {key}: {exc.format_message()}", flush=True)
            return 1
        if code:  # a typer.Exit with a non-zero code
            print(f"failed: {key}: flwr exited with code {code}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
