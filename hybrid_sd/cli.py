"""What every command-line entry point shares: an argparse parser whose errors are one line."""
from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, as for every other user error
        self.exit(2, f"error: {message} (see --help)\n")
