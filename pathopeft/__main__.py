"""``python -m pathopeft`` is the ``pathopeft`` command (useful where console scripts are not on PATH)."""

from pathopeft.cli import main

if __name__ == "__main__":
    main()
