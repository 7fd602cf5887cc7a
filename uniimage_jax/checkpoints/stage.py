"""Per-stage checkpoints on Orbax: train state, data-iterator state and run config, saved together.

Layout: ``<workdir>/<stage>/<step>/{state,data,config}`` (``workdir`` may be a ``gs://`` path).

- ``state``: the train-state pytree (trainable params, optimiser state, step, rng key; frozen
  params may be left out) as sharded arrays. Every process writes its own shards, so multi-host
  saving needs no process-0 special case. On more than one process every leaf must be a global
  ``jax.Array`` (as ``jit`` with shardings returns it): Orbax refuses single-device arrays there.
- ``data``: the data iterator state, one JSON file per process (each host reads its own shard of
  the data, so each has its own position), like grain's own Orbax handler does. Restored on
  another number of processes, every process gets all the saved states
  (``StatesOfOtherProcessCount``) to deal again.
- ``config``: the run config as JSON (written once, by the primary host).

Saving is asynchronous by default (arrays are copied to host, then written in the background);
``wait()`` blocks until the last save is on disk. Orbax keeps the newest ``keep`` steps and skips
steps off the ``save_every`` grid unless ``force=True``.

Restores are strict: the abstract state passed in must match the checkpoint key for key, in shape
and in dtype; a missing, extra or mis-shaped entry raises an error naming it, before any data is
read. Arrays are placed with the shardings carried by the abstract state, whatever the sharding
at save time.

The state's parameter entries: ``params`` (the trainable tree) and, when the stage keeps one, its
exponential moving average under ``EMA_KEY``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from uniimage_jax.errors import ConfigError
from uniimage_jax.paths import absolute

log = logging.getLogger(__name__)

STATE, DATA, CONFIG = "state", "data", "config"
EMA_KEY = "ema"  # the train state's entry for the EMA of the trainable parameters
ITEM_NAMES = (STATE, DATA, CONFIG)


# --------------------------------------------------------------------------------------------
# Data-iterator state: one JSON file per process.
# --------------------------------------------------------------------------------------------
def _data_filename(process_index: int, process_count: int) -> str:
    return f"process_{process_index}-of-{process_count}.json"


def _encode_data_state(data_state: Any) -> Any:
    """JSON-able dicts are stored as they are; grain's iterator state (JSON text as bytes/str) is
    wrapped so restore gives back the same type."""
    if isinstance(data_state, bytes):
        return {"__grain_state_bytes__": data_state.decode("utf-8")}
    if isinstance(data_state, str):
        return {"__grain_state_str__": data_state}
    if data_state is None or isinstance(data_state, dict):
        return data_state
    raise TypeError(
        f"data_state must be a JSON-able dict, grain's iterator state (bytes/str) or None, "
        f"got {type(data_state).__name__}")


def _decode_data_state(stored: Any) -> Any:
    if isinstance(stored, dict) and set(stored) == {"__grain_state_bytes__"}:
        return stored["__grain_state_bytes__"].encode("utf-8")
    if isinstance(stored, dict) and set(stored) == {"__grain_state_str__"}:
        return stored["__grain_state_str__"]
    return stored


@dataclasses.dataclass
class StatesOfOtherProcessCount:
    """What restoring the data item gives a process when the checkpoint was written by another
    number of processes: every process's state, by process index (the caller deals them again,
    `uniimage_jax.data.iterator_state`)."""
    states: list


def _states_of_other_count(directory: epath.Path) -> StatesOfOtherProcessCount | None:
    """All processes' files, when they are the complete set of one earlier process count."""
    found = {}
    for p in directory.iterdir() if directory.exists() else ():
        m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", p.name)
        if m:
            found.setdefault(int(m[2]), {})[int(m[1])] = p
    complete = [n for n, files in found.items() if sorted(files) == list(range(n))]
    if len(complete) != 1:
        return None
    files = found[complete[0]]
    return StatesOfOtherProcessCount(
        [_decode_data_state(json.loads(files[i].read_text())) for i in sorted(files)])


class PerProcessJsonHandler(ocp.CheckpointHandler):
    """Each process writes and reads its own JSON file (the data iterator state is per host); a
    checkpoint of another process count gives every process all the files' states."""

    def save(self, directory: epath.Path, args: "PerProcessJsonSave"):
        directory.mkdir(parents=True, exist_ok=True)
        name = _data_filename(jax.process_index(), jax.process_count())
        (directory / name).write_text(json.dumps(_encode_data_state(args.item)))

    def restore(self, directory: epath.Path, args: Optional["PerProcessJsonRestore"] = None):
        path = directory / _data_filename(jax.process_index(), jax.process_count())
        if not path.exists():
            other = _states_of_other_count(directory)
            if other is not None:
                return other
            found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
            raise FileNotFoundError(
                f"checkpoint item 'data': no iterator state for this process at {path} "
                f"(found {found}); was the checkpoint written with a different process count?")
        return _decode_data_state(json.loads(path.read_text()))

    def metadata(self, directory: epath.Path):
        return None

    def finalize(self, directory: epath.Path):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(PerProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class PerProcessJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(PerProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class PerProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


# --------------------------------------------------------------------------------------------
# Strict structure / shape / dtype check of an abstract tree against a checkpoint's metadata.
# --------------------------------------------------------------------------------------------
def _stored_shape_dtype(leaf) -> jax.ShapeDtypeStruct:
    """What a target leaf looks like on disk: typed PRNG keys are stored as their key data."""
    shape, dtype = np.shape(leaf), getattr(leaf, "dtype", None)
    if dtype is None:
        arr = np.asarray(leaf)
        shape, dtype = arr.shape, arr.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
    return jax.ShapeDtypeStruct(shape, dtype)


def _flatten_by_path(tree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in flat:
        key = "/".join(_key_name(k) for k in path)
        out[key] = leaf
    return out


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def check_matches_checkpoint(abstract_tree, stored_metadata, item: str, *, partial: bool = False):
    """Raise ValueError naming every key that is missing, extra, mis-shaped or of another dtype.

    ``partial``: keys stored but absent from ``abstract_tree`` are allowed (params-only restore).
    """
    stored = _flatten_by_path(stored_metadata)
    wanted = _flatten_by_path(abstract_tree)
    problems = []
    missing = sorted(set(wanted) - set(stored))
    if missing:
        problems.append(f"missing from the checkpoint: {missing}")
    extra = sorted(set(stored) - set(wanted))
    if extra and not partial:
        problems.append(f"in the checkpoint but not in the restore target: {extra}")
    for key in sorted(set(wanted) & set(stored)):
        want = _stored_shape_dtype(wanted[key])
        have = stored[key]
        have_shape = tuple(getattr(have, "shape", ()))
        have_dtype = getattr(have, "dtype", None)
        if tuple(want.shape) != have_shape:
            problems.append(f"{key}: checkpoint shape {have_shape} != target shape {tuple(want.shape)}")
        elif have_dtype is not None and np.dtype(have_dtype) != np.dtype(want.dtype):
            problems.append(f"{key}: checkpoint dtype {np.dtype(have_dtype)} != target dtype "
                            f"{np.dtype(want.dtype)}")
    if problems:
        raise ConfigError(f"checkpoint item '{item}' does not match the restore target:\n  "
                          + "\n  ".join(problems))


def _require_shardings(abstract_tree, item: str):
    """Every restore target leaf must say where its array goes."""
    unplaced = [key for key, leaf in _flatten_by_path(abstract_tree).items()
                if getattr(leaf, "sharding", None) is None]
    if unplaced:
        raise ValueError(
            f"restore target for '{item}' has leaves without a sharding: {unplaced}; build it "
            "with jax.ShapeDtypeStruct(shape, dtype, sharding=...)")


def _restore_args_tree(abstract_tree):
    """Orbax restore args placing each array with the sharding its abstract leaf carries."""
    return jax.tree.map(
        lambda leaf: ocp.ArrayRestoreArgs(sharding=leaf.sharding, dtype=leaf.dtype,
                                          global_shape=np.shape(leaf)), abstract_tree)


def _to_abstract(tree):
    """Concrete arrays -> ShapeDtypeStruct with their sharding; abstract leaves pass through."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _config_to_json(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    try:
        return json.loads(json.dumps(config))
    except TypeError as e:
        raise TypeError(f"checkpoint item 'config' must be JSON-serialisable: {e}") from None


# --------------------------------------------------------------------------------------------
# The stage checkpointer.
# --------------------------------------------------------------------------------------------
class StageCheckpointer:
    """Checkpoints of one training stage under ``<workdir>/<stage>/``.

    Call ``save`` every step: steps that are not multiples of ``save_every`` return False without
    saving (``force=True`` saves anyway, e.g. on preemption or at the last step); a step that is
    already saved is not saved again. Every process must call
    ``save`` and ``restore`` (Orbax synchronises the hosts).
    """

    def __init__(self, workdir: str, stage: str, *, keep: int = 3, save_every: int = 1000,
                 async_save: bool = True):
        if not stage or "/" in stage:
            raise ConfigError(f"stage must be a plain directory name, got {stage!r}")
        if keep < 1:
            raise ConfigError(f"keep must be >= 1, got {keep}")
        if save_every < 1:
            raise ConfigError(f"save_every must be >= 1, got {save_every}")
        self.directory = epath.Path(absolute(workdir)) / stage  # Orbax needs absolute paths
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            enable_async_checkpointing=async_save,
            create=True,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add(STATE, ocp.args.StandardSave, ocp.StandardCheckpointHandler())
        registry.add(STATE, ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
        registry.add(DATA, PerProcessJsonSave, PerProcessJsonHandler())
        registry.add(DATA, PerProcessJsonRestore, PerProcessJsonHandler())
        registry.add(CONFIG, ocp.args.JsonSave, ocp.JsonCheckpointHandler())
        registry.add(CONFIG, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)

    # -- queries ------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        """The newest finalised step in this stage, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def stored_state_keys(self, step: Optional[int] = None) -> set[str]:
        """The top-level entries of a step's train state (default: the latest step), read from
        its metadata: e.g. whether it holds an EMA."""
        step = self.latest_step() if step is None else step
        stored = _flatten_by_path(_metadata_tree(self._manager.item_metadata(step)[STATE]))
        return {key.split("/", 1)[0] for key in stored}

    # -- save ---------------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_state: Any, config: Any, force: bool = False) -> bool:
        """Save (asynchronously when enabled) if ``step`` is on the save grid or ``force``.

        Returns whether a save was started. Raises if ``step`` already exists.
        """
        step = int(step)
        if not force and step % self.save_every != 0:
            return False
        if step in self._manager.all_steps():
            # E.g. a forced final save right after a grid save of the same step.
            log.info("checkpoint step %d already exists in %s; not saving again", step,
                     self.directory)
            return False
        args = ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(_present_fields(state)),
            DATA: PerProcessJsonSave(data_state),
            CONFIG: ocp.args.JsonSave(_config_to_json(config)),
        })
        # The grid is ours (Orbax would also save the first step it sees); Orbax still keeps N.
        return self._manager.save(step, args=args, force=True)

    # -- restore ------------------------------------------------------------------------------
    def restore(self, step: Optional[int] = None, *, abstract_state: Any):
        """Restore ``(state, data_state, config)`` of ``step`` (default: the latest).

        ``abstract_state``: the state's pytree of ``jax.ShapeDtypeStruct`` (or arrays) whose
        shardings say where restored arrays go. It must match the checkpoint exactly.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"step {step} not found in {self.directory} (steps: {self.all_steps()})")
        self._check_items_present(step)
        template = abstract_state
        abstract_state = _to_abstract(_present_fields(abstract_state))
        _require_shardings(abstract_state, STATE)
        stored = self._manager.item_metadata(step)[STATE]
        check_matches_checkpoint(abstract_state, _metadata_tree(stored), STATE)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: PerProcessJsonRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }))
        state = restored[STATE]
        if dataclasses.is_dataclass(template):
            state = dataclasses.replace(template, **state)
        return state, restored[DATA], restored[CONFIG]

    def _check_items_present(self, step: int):
        step_dir = _step_dir(self.directory, step)
        missing = [name for name in ITEM_NAMES if not (step_dir / name).exists()]
        if missing:
            raise FileNotFoundError(f"checkpoint {step_dir} lacks item(s) {missing}")

    # -- lifecycle ----------------------------------------------------------------------------
    def wait(self):
        """Block until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self):
        """Wait for pending saves, then release the manager's resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _present_fields(state):
    """A dataclass state as the dict of its fields that are not None (what is stored; a None
    field such as a disabled EMA is simply absent, as in checkpoints written before it existed);
    any other tree as it is."""
    if not dataclasses.is_dataclass(state):
        return state
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if getattr(state, f.name) is not None}


def _metadata_tree(item_metadata):
    """The pytree of per-array metadata inside Orbax's TreeMetadata wrapper."""
    return getattr(item_metadata, "tree", item_metadata)


def _step_dir(stage_dir: epath.Path, step: int) -> epath.Path:
    return stage_dir / str(step)


def _resolve_state_dir(path_or_stage_dir) -> epath.Path:
    """A stage dir (latest step), a step dir, or a step's ``state`` item dir -> the ``state`` dir."""
    path = epath.Path(absolute(path_or_stage_dir))  # Orbax needs absolute paths
    if not path.exists():
        raise FileNotFoundError(f"init_from checkpoint path {path} does not exist")
    if path.name == STATE and (path / "_METADATA").exists():
        return path
    if (path / STATE).exists():
        return path / STATE
    steps = ocp.utils.checkpoint_steps(path)
    if not steps:
        raise FileNotFoundError(
            f"init_from checkpoint path {path} is neither a stage dir with finalised steps, "
            f"a step dir nor a '{STATE}' item dir")
    state_dir = _step_dir(path, max(steps)) / STATE
    if not state_dir.exists():
        raise FileNotFoundError(f"checkpoint {state_dir.parent} lacks item '{STATE}'")
    return state_dir


def restore_params_only(path_or_stage_dir, abstract_params, *, params_key: str = "params"):
    """Restore only ``state[params_key]`` from another stage's checkpoint (for ``init_from``).

    ``path_or_stage_dir``: a stage directory (its latest step is used), a step directory, or a
    step's ``state`` directory. Optimiser state, step and rng of the previous stage are not read.
    ``abstract_params`` must match the stored params exactly (names, shapes, dtypes); arrays are
    placed with its shardings.
    """
    state_dir = _resolve_state_dir(path_or_stage_dir)
    abstract_params = _to_abstract(abstract_params)
    with ocp.PyTreeCheckpointer() as checkpointer:
        stored = _metadata_tree(ocp.PyTreeCheckpointHandler().metadata(state_dir))
        if params_key not in stored:
            raise ConfigError(f"checkpoint {state_dir} has no '{params_key}' entry "
                              f"(top-level keys: {sorted(stored)})")
        check_matches_checkpoint({params_key: abstract_params}, {params_key: stored[params_key]},
                                 f"{STATE}/{params_key}")
        target = {params_key: abstract_params}
        _require_shardings(target, f"{STATE}/{params_key}")
        restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=target, restore_args=_restore_args_tree(target), partial_restore=True))
    return restored[params_key]


def stored_state_entries(path_or_stage_dir) -> set[str]:
    """Top-level entries of a stored train state (a stage dir's latest step, a step dir or a
    ``state`` dir), from its metadata only: e.g. whether it holds an EMA."""
    state_dir = _resolve_state_dir(path_or_stage_dir)
    stored = _metadata_tree(ocp.PyTreeCheckpointHandler().metadata(state_dir))
    return {key.split("/", 1)[0] for key in _flatten_by_path(stored)}


StageCheckpointer.restore_params_only = staticmethod(restore_params_only)


# --------------------------------------------------------------------------------------------
# Preemption.
# --------------------------------------------------------------------------------------------


