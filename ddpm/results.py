"""`python -m ddpm.results SWEEP_DIR`: the sweep tables, kept at this name for users' commands;
the code is `ddpm.cli.results`."""

from ddpm.cli.results import main

if __name__ == "__main__":
    main()
