"""`python -m crosscoder.train`: the documented entry point, kept where users and launch files call it (the
command itself lives in crosscoder.cli.train)."""

from crosscoder.cli.train import main, sweep_group

__all__ = ["main", "sweep_group"]

if __name__ == "__main__":
    main()
