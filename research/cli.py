"""Argument parsing for the commands that take no config (sweeps, reports, tokenizers, corpora):
a bad command line stops with one sentence that ends with the command's usage, never a usage
block and a traceback. Also the check, for every command, of a folder it will write in."""

import argparse
import os
import re
import tempfile


class Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors raise ValueError with one sentence (the caller prints it as
  `error: ...` and exits with status 2); subcommands take it through parser_class=Parser."""

  def error(self, message):
    usage = re.sub(r'\s+', ' ', self.format_usage()).strip().rstrip('.')
    raise ValueError(f'{message[:1].upper()}{message[1:]}; {usage}.')


def check_folder(path, what):
  """One sentence, before any work, where the folder `path` (given as `what`, e.g. '--out')
  could not be made or written in: a file, a path under a file, or a place where a folder cannot
  be made (tried, and removed again: os.access grants root everything, even /sys). Makes
  nothing."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'{what} {path} is a file; pass a folder (it is made if missing).')
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'{what} {path} lies under the file {existing}; pass a path in a folder.')
  try:
    tempfile.TemporaryDirectory(dir=existing).cleanup()
  except OSError as error:
    raise ValueError(f'{what} {path} cannot be written ({error.strerror or error}); pass a '
                     'folder you can write.') from None


def check_file(path, what):
  """As check_folder, for the file `path` (given as `what`) that a command will write: a folder
  (or a path ending in a separator) is one sentence too. Makes nothing."""
  if os.path.isdir(path) or path.endswith(os.sep):
    raise ValueError(f'{what} {path} is a folder; pass the path of a file.')
  check_folder(os.path.dirname(os.path.abspath(path)), f'{what} {path}: its folder')
