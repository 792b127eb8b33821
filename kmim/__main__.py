"""The ``kmim`` command (the console script, and ``python -m kmim``): :mod:`kmim.cli`, imported with the cyclic
collector off."""

import gc


def main() -> None:
    # Importing the CLI imports torch: a few hundred thousand objects and no garbage, over which the collector ran
    # three full passes meanwhile (0.12-0.2 s of the 1.2-1.4 s the imports took).
    gc.disable()
    try:
        from kmim import cli
    finally:
        gc.enable()
    cli.main()


if __name__ == "__main__":
    main()
