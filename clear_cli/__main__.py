"""`python -m clear_cli ...` and `accelerate launch -m clear_cli distill ...`."""

from clear_cli.cli.app import main

if __name__ == "__main__":
    main()
