"""One error type for bad user input, and the CLI wrapper that turns it into one clear line."""
from __future__ import annotations

import argparse
import functools
import sys

from model.config import ConfigError


class UserError(Exception):
    """Input the user can fix. The message is one line that names the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with usage mistakes reported like every other bad input: one line, exit 2
    (argparse's default prints the whole usage block first, burying the line that matters)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def cli(main):
    """Run `main`; print user errors as a single `error: ...` line and exit non-zero."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except (UserError, ConfigError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
