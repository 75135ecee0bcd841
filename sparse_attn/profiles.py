"""Per-model head profiles: for every layer and query head, the sparse pattern and its budget.

One human-readable JSON file per model in patches/<model-name>.json:

    {"format": "sparse_attn.profile/1",
     "model": {"name", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim"},
     "settings": {...how it was profiled...},
     "layers": [[head dict, ... one per query head], ... one per layer]}

A head dict names its pattern (a registered one, sparse_attn.patterns, or "dense") and that pattern's
budgets, typed and bounded by its registry entry (ints and floats); extra keys (e.g. the measured
"recall") are kept and ignored by the kernels:
    {"pattern": "<name>", "<budget>": <value>, ...}
    {"pattern": "dense"}
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .patterns import check_budget_head, patterns

__all__ = [
    "FORMAT",
    "Profile",
    "check_head_config",
    "check_head",
    "load_profile",
    "save_profile",
    "find_profile",
    "match_profile",
    "profile_filename",
    "from_minference_config",
    "PATCHES_DIR",
]

FORMAT = "sparse_attn.profile/1"

MODEL_KEYS = ("name", "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")

# The repository's patches/ folder; SPARSE_ATTN_PATCHES points elsewhere (e.g. for an installed package).
PATCHES_DIR = Path(__file__).resolve().parent.parent / "patches"


def check_head(head: Any, where: str) -> Dict[str, Any]:
    """Validate one head dict; `where` (e.g. "layer 3, head 5") prefixes every error."""
    return check_budget_head(head, where)


def check_head_config(head_config: Any, num_heads: int, where: str = "head_config") -> List[Dict[str, Any]]:
    """Validate one layer's per-head configs: a list of num_heads head dicts."""
    if not isinstance(head_config, (list, tuple)):
        raise TypeError(f"{where}: expected a list of {num_heads} head dicts, got {type(head_config).__name__}")
    if len(head_config) != num_heads:
        raise ValueError(f"{where}: expected {num_heads} head dicts (one per query head), got {len(head_config)}")
    return [check_head(h, f"{where}, head {i}") for i, h in enumerate(head_config)]


@dataclass
class Profile:
    """A validated profile. layers[l][h] is the head dict of query head h in layer l."""

    model: Dict[str, Any]
    layers: List[List[Dict[str, Any]]]
    settings: Dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self):
        if self.format != FORMAT:
            raise ValueError(f"format: expected {FORMAT!r}, got {self.format!r}")
        if not isinstance(self.model, dict):
            raise TypeError(f"model: expected a dict with keys {list(MODEL_KEYS)}, got {type(self.model).__name__}")
        missing = [k for k in MODEL_KEYS if k not in self.model]
        if missing:
            raise ValueError(f"model: missing keys {missing} (expected {list(MODEL_KEYS)})")
        for key in MODEL_KEYS[2:]:
            value = self.model[key]
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{key}: expected a positive int, got {value!r}")
        if not isinstance(self.settings, dict):
            raise TypeError(f"settings: expected a dict, got {type(self.settings).__name__}")
        if not isinstance(self.layers, (list, tuple)) or len(self.layers) != self.num_layers:
            got = len(self.layers) if isinstance(self.layers, (list, tuple)) else type(self.layers).__name__
            raise ValueError(f"layers: expected {self.num_layers} layers (model.num_layers), got {got}")
        self.layers = [check_head_config(layer, self.num_heads, f"layer {i}") for i, layer in enumerate(self.layers)]

    @property
    def num_layers(self) -> int:
        return self.model["num_layers"]

    @property
    def num_heads(self) -> int:
        return self.model["num_heads"]

    def layer(self, index: int) -> List[Dict[str, Any]]:
        """The head configs of one layer (the `head_config` argument of sparse_attention)."""
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer: expected an index in [0, {self.num_layers}), got {index}")
        return self.layers[index]

    def check_model(self, num_layers: int, num_heads: int, num_kv_heads: Optional[int] = None,
                    head_dim: Optional[int] = None) -> None:
        """Raise a ValueError naming every field where the profile and the model disagree."""
        wanted = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        wrong = [f"{k}: profile has {self.model[k]}, model has {v}" for k, v in wanted.items()
                 if v is not None and self.model[k] != v]
        if wrong:
            raise ValueError(f"profile for {self.model['name']!r} does not match the model: " + "; ".join(wrong))

    def to_dict(self) -> Dict[str, Any]:
        return {"format": self.format, "model": dict(self.model), "settings": dict(self.settings),
                "layers": [[dict(h) for h in layer] for layer in self.layers]}

    def pattern_counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for layer in self.layers:
            for head in layer:
                counts[head["pattern"]] = counts.get(head["pattern"], 0) + 1
        return counts


def load_profile(source: Union[str, os.PathLike, Dict[str, Any], Profile]) -> Profile:
    """A Profile from a path to a JSON file, a dict of that JSON, or a Profile (returned as is)."""
    if isinstance(source, Profile):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"profile: no file at {str(path)!r}")
        with open(path) as f:
            source = json.load(f)
    if not isinstance(source, dict):
        raise TypeError(f"profile: expected a path, a dict or a Profile, got {type(source).__name__}")
    unknown = set(source) - {"format", "model", "settings", "layers"}
    if unknown:
        raise ValueError(
            f"profile: unknown top-level keys {sorted(unknown)} (expected format, model, settings, layers)"
        )
    if "layers" not in source or "model" not in source:
        raise ValueError("profile: expected the keys 'model' and 'layers'")
    return Profile(model=source["model"], layers=source["layers"], settings=source.get("settings", {}),
                   format=source.get("format", FORMAT))


def _dump_layers(layers) -> str:
    # One head per line keeps a 30 x 9 profile readable and its diffs small.
    rows = []
    for layer in layers:
        heads = ",\n".join("    " + json.dumps(h) for h in layer)
        rows.append("  [\n" + heads + "\n  ]")
    return "[\n" + ",\n".join(rows) + "\n]"


def save_profile(profile: Union[Profile, Dict[str, Any]], path: Union[str, os.PathLike]) -> Path:
    """Write the profile as JSON (validated first); returns the path."""
    profile = load_profile(profile)
    d = profile.to_dict()
    text = (
        "{\n"
        f'"format": {json.dumps(d["format"])},\n'
        f'"model": {json.dumps(d["model"])},\n'
        f'"settings": {json.dumps(d["settings"], indent=1)},\n'
        f'"layers": {_dump_layers(d["layers"])}\n'
        "}\n"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def profile_filename(model_name: str) -> str:
    """patches/ file name for a model: its last path component, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    -> "SmolLM2-135M-Instruct.json"; characters other than letters, digits, '.', '_' and '-' become '_'."""
    base = str(model_name).rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", base) + ".json"


def _patch_dirs() -> List[Path]:
    extra = os.environ.get("SPARSE_ATTN_PATCHES")
    return ([Path(p) for p in extra.split(os.pathsep) if p] if extra else []) + [PATCHES_DIR]


def find_profile(model_name: str, dirs: Optional[Sequence[Union[str, os.PathLike]]] = None) -> Optional[Path]:
    """The profile for `model_name` in patches/ (and $SPARSE_ATTN_PATCHES), or None.

    Looks for the file named by profile_filename (case-insensitive), then for any *.json there whose
    model.name equals model_name or ends with its last path component.
    """
    dirs = [Path(d) for d in dirs] if dirs is not None else _patch_dirs()
    wanted = profile_filename(model_name).lower()
    base = str(model_name).rstrip("/").split("/")[-1]
    for d in dirs:
        files = sorted(d.glob("*.json")) if d.is_dir() else []
        for f in files:
            if f.name.lower() == wanted:
                return f
        for f in files:
            try:
                name = str(json.loads(f.read_text()).get("model", {}).get("name", ""))
            except (ValueError, AttributeError, OSError):
                continue
            if name == str(model_name) or name.rstrip("/").split("/")[-1] == base:
                return f
    return None


# Words that name a variant of a checkpoint rather than the model (a GGUF's general.name often drops them).
_VARIANT_WORDS = {"instruct", "chat", "base", "it", "hf", "gguf"}


def _name_words(name: str) -> set:
    """Lower-case words of a name: letters and digits split on anything else ("SmolLM2-135M" -> smollm2, 135m)."""
    return {w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w}


def _name_match(profile_name: str, names: Sequence[str]) -> int:
    """2: a name is the profile's model name (or its last path component), case-insensitively; 1: every word of
    the profile's last path component but variant words (instruct, chat, ...) is a word of one of the names
    (a GGUF's "Smollm2 135M 8k ..." for "HuggingFaceTB/SmolLM2-135M-Instruct"); 0: no match."""
    base = profile_name.rstrip("/").split("/")[-1].lower()
    if not base:
        return 0
    for n in names:
        n = str(n).rstrip("/").lower()
        if n == profile_name.lower() or n.split("/")[-1] == base:
            return 2
    words = _name_words(base) - _VARIANT_WORDS
    return int(bool(words) and any(words <= _name_words(n) for n in names))


def match_profile(identity: Dict[str, Any], names: Sequence[str],
                  dirs: Optional[Sequence[Union[str, os.PathLike]]] = None) -> Optional[Path]:
    """The profile in patches/ (and $SPARSE_ATTN_PATCHES) made for this model, or None.

    identity: the model's architecture (class name, e.g. "LlamaForCausalLM"), num_layers, num_heads,
    num_kv_heads and head_dim; a profile must agree on all of them. names: what the checkpoint calls itself
    (its path or hub id, the name stored in the checkpoint, e.g. a GGUF's general.name). Among the profiles of
    that shape, one whose model name is one of the names wins, else one whose name's words all occur in one of
    them (see _name_match); the shape alone never picks a profile."""
    dirs = [Path(d) for d in dirs] if dirs is not None else _patch_dirs()
    names = [str(n) for n in names if n]
    best, best_score = None, 0
    for d in dirs:
        for f in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                model = json.loads(f.read_text()).get("model", {})
            except (ValueError, AttributeError, OSError):
                continue
            if not isinstance(model, dict) or any(model.get(k) != identity.get(k) for k in MODEL_KEYS[1:]):
                continue
            named = any(f.name.lower() == profile_filename(n).lower() for n in names)
            score = 2 if named else _name_match(str(model.get("name", "")), names)
            if score > best_score:
                best, best_score = f, score
    return best


def _from_minference_head(entry, where: str) -> Dict[str, Any]:
    """MInference's [pattern, vertical, slash, score] as our head dict, through the pattern entries that
    read MInference's names (Pattern.minference_name / .minference)."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 3:
        raise ValueError(f"{where}: expected [pattern, vertical, slash, score], got {entry!r}")
    name, vertical, slash = entry[0], int(entry[1]), int(entry[2])
    score = float(entry[3]) if len(entry) > 3 else None
    known = {p.minference_name: p for p in patterns() if p.minference_name is not None}
    if name not in known:
        raise ValueError(f"{where}: unknown MInference pattern {name!r} (expected one of {sorted(known)})")
    head = {"pattern": known[name].name, **known[name].minference(vertical, slash)}
    if score is not None:
        head["minference_score"] = score
    return head


def from_minference_config(obj, model_info: Dict[str, Any]) -> Profile:
    """Import an MInference "best pattern" config: a list (one per layer) of {head: [pattern, vertical,
    slash, score]} dicts, given as that list or a path to its JSON file. model_info supplies the model
    keys (name, architecture, num_layers, num_heads, num_kv_heads, head_dim); num_layers and num_heads
    default to the config's own counts."""
    source = None
    if isinstance(obj, (str, os.PathLike)):
        source = str(obj)
        with open(obj) as f:
            obj = json.load(f)
    if not isinstance(obj, list) or not all(isinstance(layer, dict) for layer in obj):
        raise TypeError(
            "minference config: expected a list (one per layer) of {head: [pattern, vertical, slash, score]}"
        )
    model = dict(model_info)
    model.setdefault("num_layers", len(obj))
    model.setdefault("num_heads", len(obj[0]) if obj else 0)
    layers = []
    for li, layer in enumerate(obj):
        heads = sorted(layer.items(), key=lambda kv: int(kv[0]))
        if [int(h) for h, _ in heads] != list(range(len(heads))):
            got = [h for h, _ in heads]
            raise ValueError(f"minference config, layer {li}: expected heads 0..{len(heads) - 1}, got {got}")
        layers.append([_from_minference_head(e, f"minference config, layer {li}, head {h}") for h, e in heads])
    settings = {"imported_from": "minference", "source": source}
    return Profile(model=model, layers=layers, settings=settings)
