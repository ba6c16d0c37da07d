"""Argument parsing for the commands that take no config (sweeps, reports, tokenizers, corpora):
a bad command line stops with one sentence that ends with the command's usage, never a usage
block and a traceback."""

import argparse
import re


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors raise ValueError with one sentence (the caller prints it as
  `error: ...` and exits with status 2); subcommands take it through parser_class=Parser."""

  def error(self, message):
    usage = re.sub(r'\s+', ' ', self.format_usage()).strip().rstrip('.')
    raise ValueError(f'{message[:1].upper()}{message[1:]}; {usage}.')
