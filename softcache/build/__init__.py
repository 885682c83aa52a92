"""The teacher pass behind ``softcache build``, one module per stage:

* :mod:`.inputs`: the dataset to run over (files, saved datasets, chat data) → tokenised documents → sequences;
* :mod:`.plan`: windows and length-grouped batches, and the background writer thread;
* :mod:`.teacher`: loading the teacher, its body/output-layer split, targets from hidden states in row chunks
  (through :mod:`softcache.sparsify`, the one logits → targets implementation);
* :mod:`.distributed`: checking ``--out`` (resume, refuse, overwrite) and merging the ranks of a ``torchrun`` build;
* :mod:`.run`: :func:`build`, which ties them together;
* :mod:`.generate`: ``generate`` (``softcache generate``, also ``softcache.generate``): the teacher's answers to
  prompts, with its targets at every generated token, from the same pieces.
"""

from .run import BuildResult, build, build_demo

__all__ = ["BuildResult", "build", "build_demo"]
