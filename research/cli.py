"""Argument parsing for the commands that take no config (sweeps, reports, tokenizers, corpora):
a bad command line stops with one sentence that ends with the command's usage, never a usage
block and a traceback. Also the check, for every command, of a folder it will write in, and
Ctrl-C for the commands with nothing to save."""

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading


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
    # A dot-name, which listings of the folder (pretokenize's shard folder check) pass over.
    tempfile.TemporaryDirectory(prefix='.writable-', dir=existing).cleanup()
  except OSError as error:
    raise ValueError(f'{what} {path} cannot be written ({error.strerror or error}); pass a '
                     'folder you can write.') from None


def check_file(path, what):
  """As check_folder, for the file `path` (given as `what`) that a command will write: a folder
  (or a path ending in a separator) is one sentence too. Makes nothing."""
  if os.path.isdir(path) or path.endswith(os.sep):
    raise ValueError(f'{what} {path} is a folder; pass the path of a file.')
  check_folder(os.path.dirname(os.path.abspath(path)), f'{what} {path}: its folder')


def exit_on_interrupt(sentence):
  """Makes Ctrl-C (SIGINT) end this process at once with `sentence` and exit status 130, for a
  command with nothing to save. Python runs its own handlers only between bytecodes, so a
  KeyboardInterrupt waits for a long call (an XLA compilation, SentencePiece's training) to
  return, and the interpreter's exit then crashes on XLA's threads; the C-level handler writes
  the signal to a pipe at once, which a thread watches. Called from the main thread, before any
  other SIGINT handler; a SIGINT the process was started to ignore stays ignored."""
  if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # E.g. a shell script's `cmd &`.
    return

  def leave(*_):
    try:
      for path in list(_REMOVED_ON_INTERRUPT):
        shutil.rmtree(path, ignore_errors=True)
      os.write(sys.stderr.fileno(), f'\n{sentence}\n'.encode())
    except OSError:  # No one reads stderr any more: exit all the same.
      pass
    finally:
      os._exit(130)

  def watch():
    while os.read(read, 1) != bytes([signal.SIGINT]):  # Other signals' handlers write too.
      pass
    leave()
  read, write = os.pipe()
  os.set_blocking(write, False)
  # Python's own handler does the same, should the wakeup pipe be replaced.
  signal.signal(signal.SIGINT, leave)
  signal.set_wakeup_fd(write)
  threading.Thread(target=watch, daemon=True, name='exit_on_interrupt').start()


_REMOVED_ON_INTERRUPT = []


@contextlib.contextmanager
def removed_on_interrupt(path):
  """Within the block, an exit_on_interrupt exit first removes the folder `path` (a scratch
  folder that the block's own clean-up would have removed)."""
  _REMOVED_ON_INTERRUPT.append(path)
  try:
    yield path
  finally:
    _REMOVED_ON_INTERRUPT.remove(path)
