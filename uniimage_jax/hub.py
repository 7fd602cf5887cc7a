"""Hugging Face Hub model ids wherever a Hugging Face / diffusers model directory is read.

A user may name a published model as its model card does, `Qwen/Qwen2.5-VL-3B-Instruct`, where a
command or config field takes such a directory: `uniimage-convert`'s `--src` (mllm, dit, vae,
tbac), `--mllm`, `--dit`, `--vae`; the `--processor` of uniimage-sample, -understand and -app; and
`config.processor_dir`. The spelling, as huggingface_hub's own `hf://` paths write it:

    [hf://]ORG/NAME[@REVISION][/SUBFOLDER]

REVISION is a branch, tag or commit hash without '/' (default: main; a commit pins the files);
SUBFOLDER a folder inside the repository (`Efficient-Large-Model/Sana_1600M_512px_diffusers/
transformer`). Converted checkpoints and training stages (`--checkpoint`, `pretrained.*`,
`init_from`) are this project's own Orbax directories, never Hub models: they stay paths.

`resolve` turns such a name into a local directory:
1. A local path that exists always wins: `Qwen/Qwen2.5-VL-3B-Instruct` that is a folder under the
   current directory is that folder. Only `hf://...` always means the Hub.
2. Otherwise the id is fetched with huggingface_hub's `snapshot_download` into its cache
   (`HF_HUB_CACHE`, or `HF_HOME`/hub, default ~/.cache/huggingface/hub; a second run finds it
   there), and only the files the caller reads: for weights the config JSON files and the
   safetensors shards the index names (every safetensors of the folder when it has no index),
   never pickles; for a processor the tokenizer and processor files, no weights.
3. Offline (`HF_HUB_OFFLINE=1`), or when the Hub cannot be reached, the cached snapshot of that
   revision is used. Without one, one line names the id and the command that fetches it, and
   the command exits with status 2, as for any bad input.

So downloads happen only when a user names a Hub model and the machine is online; nothing else in
the project reaches the network. The library does the fetching, caching, locking and offline
handling; this module only decides what a name means and which files to ask for.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re

from uniimage_jax.errors import UserError
from uniimage_jax.paths import absolute, is_url

WEIGHTS = "weights"
CONFIG = "config"
PROCESSOR = "processor"
HUB_SCHEME = "hf://"

_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"  # huggingface_hub's repo-id part rules
_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w.-]+))?"
                 rf"(?P<sub>(?:/{_PART})*)/?")
# What a processor directory needs (transformers' tokenizer, chat template, image processor).
_PROCESSOR_FILES = ("*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken")


@dataclasses.dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None
    subfolder: str

    def __str__(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{rev}" + (f"/{self.subfolder}" if self.subfolder else "")


def parse(spec) -> HubRef | None:
    """The Hub reference `spec` spells, or None (a path, a URL, or not an id's shape)."""
    if not isinstance(spec, str) or not spec:
        return None
    text = spec[len(HUB_SCHEME):] if spec.startswith(HUB_SCHEME) else spec
    if text is spec and (is_url(spec) or os.path.isabs(spec) or spec.startswith(("~", "."))):
        return None
    m = _ID.fullmatch(text)
    if m is None or "--" in m["repo"] or ".." in text:
        return None
    return HubRef(m["repo"], m["revision"], m["sub"].strip("/"))


def is_hub_id(spec) -> bool:
    """Whether `spec` names a Hub model: `hf://...`, or an id's shape with no local path of that
    spelling (a local path always wins)."""
    if parse(spec) is None:
        return False
    return spec.startswith(HUB_SCHEME) or not os.path.exists(spec)


def entered(spec):
    """A model-directory argument as it enters a command: a Hub id kept as typed (it is resolved
    when read, and stays meaningful on another machine), anything else made absolute."""
    return spec if is_hub_id(spec) else absolute(spec)


def resolve(spec, *, files: str = WEIGHTS, what: str = "", component: str | None = None):
    """A local directory for `spec` (module docstring): a path is returned as it is, a Hub id is
    fetched (or found in the cache). `files`: WEIGHTS, CONFIG (config JSON only: a component
    whose architecture is all that is read) or PROCESSOR, the files fetched. With `component`
    (e.g. "transformer"), a diffusers pipeline (a folder whose model_index.json names that
    component) is entered at the component's folder, so that a pipeline's model id names its
    part. `what` names the flag or field in errors."""
    if not is_hub_id(spec):
        if spec and component and _names_component(spec, component) \
                and os.path.isdir(os.path.join(spec, component)):
            return os.path.join(spec, component)
        return spec
    ref = parse(spec)
    label = f"{what} {spec!r}" if what else repr(spec)
    sub = ref.subfolder
    base = _fetch(ref, _metadata_patterns(sub, files), label)
    if component and not sub and _names_component(base, component):
        sub = component
        base = _fetch(ref, _metadata_patterns(sub, files), label)
    folder = os.path.join(base, sub) if sub else base
    lacks = None if os.path.isdir(folder) else f"the folder {sub}"
    if files == WEIGHTS and lacks is None:
        wanted = _weight_patterns(folder, sub)
        base = _fetch(ref, wanted, label, ignore=[f"{sub}/*/*" if sub else "*/*"])
        missing = [p for p in wanted if "*" not in p
                   and not os.path.isfile(os.path.join(base, p))]
        if missing or not glob.glob(os.path.join(folder, "*.safetensors")):
            lacks = ", ".join(missing[:3]) if missing else "any *.safetensors file"
    if lacks:  # offline, a snapshot that was fetched for other files
        raise UserError(f"{label}: the Hub cache's snapshot of {ref} lacks {lacks}; "
                        f"{_fetch_hint(ref)}")
    return folder


def _names_component(folder: str, component: str) -> bool:
    """Whether `folder` is a diffusers pipeline whose model_index.json lists `component`."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        return False
    try:
        with open(index) as fh:
            return component in json.load(fh)
    except (OSError, ValueError, TypeError):
        return False


def _prefixed(sub: str, patterns) -> list[str]:
    return [f"{sub}/{p}" if sub else p for p in patterns]


def _metadata_patterns(sub: str, files: str) -> list[str]:
    if files == PROCESSOR:
        return _prefixed(sub, _PROCESSOR_FILES)
    return _prefixed(sub, ("config.json", "model_index.json", "*.safetensors.index.json"))


def _weight_patterns(folder: str, sub: str) -> list[str]:
    """The shards a `*.safetensors.index.json` names (variants beside them, e.g. an fp16 copy,
    are not fetched), or every safetensors file of the folder when there is no index."""
    names = set()
    for index in glob.glob(os.path.join(folder, "*.safetensors.index.json")):
        try:
            with open(index) as fh:
                names.update(str(f) for f in json.load(fh)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return _prefixed(sub, ("*.safetensors",))  # the converter names the bad index
    return _prefixed(sub, sorted(names) if names else ("*.safetensors",))


def _fetch_hint(ref: HubRef) -> str:
    rev = f" --revision {ref.revision}" if ref.revision else ""
    return (f"fetch it with `hf download {ref.repo_id}{rev}` on a machine that is online (into "
            "the same Hugging Face cache), or pass a local directory")


def _fetch(ref: HubRef, patterns, label: str, ignore=None) -> str:
    """snapshot_download of `patterns`; the library's errors as one line each."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")
    try:
        return snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns,
                                 ignore_patterns=ignore, local_files_only=offline)
    except hub_errors.LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise UserError(f"{label}: no local directory of that name, and Hugging Face model "
                        f"{ref} is not in the Hub cache ({constants.HF_HUB_CACHE}) while {where}; "
                        f"{_fetch_hint(ref)}") from None
    except hub_errors.RevisionNotFoundError:
        raise UserError(f"{label}: Hugging Face model {ref.repo_id} has no revision "
                        f"{ref.revision!r}") from None
    except hub_errors.GatedRepoError:
        raise UserError(f"{label}: Hugging Face model {ref.repo_id} is gated: accept its terms "
                        "on its model page and log in (`hf auth login`)") from None
    except hub_errors.RepositoryNotFoundError:
        raise UserError(f"{label}: neither a local directory nor a model on the Hugging Face "
                        f"Hub ({ref.repo_id} not found, or private without a login)") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"{label}: fetching Hugging Face model {ref} failed ({detail})") from None
