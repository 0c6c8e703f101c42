"""`python -m bnnify`: the command-line interface."""

from bnnify.cli.main import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
