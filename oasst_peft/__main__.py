"""``python -m oasst_peft``: the same command as ``oasst-peft``."""

from oasst_peft.cli import main

if __name__ == "__main__":
    main()
