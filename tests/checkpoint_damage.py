"""Ways to damage a saved Orbax checkpoint on disk (real files), shared by the checkpoint and loop tests.
Each function takes a step's `state` directory."""

import os
import shutil


def largest_array_file(state_dir):
  """The biggest array data file (under an ocdbt `d/` directory): the parameters' chunk."""
  files = [
      os.path.join(d, f) for d, _, names in os.walk(state_dir) if os.path.basename(d) == "d" for f in names
  ]
  return max(files, key=os.path.getsize)


def flip_bytes(state_dir):
  """21 bytes inverted in the middle of the largest array file; its size unchanged."""
  path = largest_array_file(state_dir)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    middle = f.read(21)
    f.seek(size // 2)
    f.write(bytes(b ^ 0xFF for b in middle))
  assert os.path.getsize(path) == size


def truncate(state_dir):
  path = largest_array_file(state_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def empty(state_dir):
  shutil.rmtree(state_dir)
  os.mkdir(state_dir)


def remove_metadata(state_dir):
  os.remove(os.path.join(state_dir, "_METADATA"))
