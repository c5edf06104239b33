"""Checkpoints: one HDF5 file per save (with the parts writer, over one file per rank), logical (unsharded) tensors,
a CRC32 per dataset, atomic write.

Layout (docs/checkpoint-format.md has the full description)::

    /                      attrs: format, format_version, software_version, created, step, config_json,
                                  manifest_json, complete (written last)
    /params/<name>         one dataset per parameter, full logical shape, dtype as given
    /optimizer/<slot>/<name>   e.g. slot "m", "v": same names and shapes as /params
    /state                 attrs: state_json (the whole state dict) + each top-level scalar as its own attr
    /config                attrs: config_json (same JSON as the root attribute)
    /metrics/<table>/<column>  1-D float64, chunked, maxshape=(None,) so a later writer can extend it

The package, by job:

- ``format``: the layout, the state's JSON, the checksums, the header checks a reader makes;
- ``slabs``: what a save writes: datasets (``Out``) cut into slabs of at most ``MESSAGE_ELEMS`` elements, their
  parts and pieces (which rank holds what), the writer's staging buffers;
- ``writers``: the save engine behind both writers (gather: rank 0 writes; mpio: every rank its share), every failure
  agreed (``SaveFailed`` on every rank);
- ``parts``: the parts writer (every rank writes what it holds into its own file, a master file of virtual datasets
  joins them; in the foreground or in the background, ``checkpoint.async_save``), ``part_map`` where its pieces
  land (runs in the full tensors, the master's virtual-dataset mappings);
- ``serial``: ``save_checkpoint`` (one process, arrays in memory);
- ``reader``: ``CheckpointFile`` (a rank's hyperslabs and its share of the checksums), ``load_checkpoint``,
  ``verify_checkpoint``;
- ``rundir``: ``ckpt_XXXXXXXX.h5`` names, the ``latest`` pointer, listing, pruning, interrupted saves, what
  ``--resume auto`` tries;
- ``trainer_state``: a Trainer's checkpoint: what each rank sends of it; ``trainer_restore``: the hyperslab
  restore, the resume;
- ``placement``: where each element of a trainer's tensors lives on the grid (``ElementPlacement``), for the save.
"""

from hpc_llm.checkpoint.format import FORMAT, FORMAT_VERSION
from hpc_llm.checkpoint.format import crc as _crc  # noqa: F401 - tests
from hpc_llm.checkpoint.reader import Checkpoint, CheckpointFile, load_checkpoint, verify_checkpoint
from hpc_llm.checkpoint.rundir import (
    checkpoint_path,
    find_latest,
    list_checkpoints,
    open_latest,
    prune_checkpoints,
    read_latest,
    remove_interrupted_saves,
    resume_candidates,
    write_latest,
)
from hpc_llm.checkpoint.serial import save_checkpoint
from hpc_llm.checkpoint.trainer_restore import choose_candidates, restore_trainer, resume_trainer
from hpc_llm.checkpoint.trainer_state import save_trainer
from hpc_llm.checkpoint.writers import SaveFailed, mpio_available

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointFile",
    "SaveFailed",
    "checkpoint_path",
    "choose_candidates",
    "find_latest",
    "list_checkpoints",
    "load_checkpoint",
    "mpio_available",
    "open_latest",
    "prune_checkpoints",
    "read_latest",
    "remove_interrupted_saves",
    "restore_trainer",
    "resume_candidates",
    "resume_trainer",
    "save_checkpoint",
    "save_trainer",
    "verify_checkpoint",
    "write_latest",
]
