"""``python -m packtune ...``: the same as the ``packtune`` command."""

from packtune.cli.main import main_entry

if __name__ == "__main__":
    main_entry()
