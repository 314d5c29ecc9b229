"""Read an outside port's activation dump in the formats ports write, and rename its keys to our tap names.

Formats (detected from the file's first bytes, not its extension):

- our reference HDF5 schema (``reference_export/h5io.py``): tap names are the schema's, per-call steps included;
- ``.safetensors``: one tensor per key (bf16 and fp16 allowed);
- ``.npz``: one array per key (``numpy.savez``);
- a folder of ``.npy`` files: the key is the file name without ``.npy`` (``talker.model.norm:out.npy``). File
  systems that dislike ``:`` can write ``__`` instead (``talker.model.norm__out.npy``) or rename with ``--map``.

Key convention: ``<module path>:<point>`` (our tap names, see the README), and for a tap that runs once per call
of a decode loop ``<module path>:<point>@step_N``, N = 0, 1, 2 … the call index in call order (the same numbering
as the HDF5 schema's ``…/<point>/step_NNNNN`` datasets). A port that uses its own names passes ``--map FILE``.

Map file (text; ``#`` starts a comment; one rule per line, tried in order, first match wins)::

    # PATTERN -> TARGET
    tlk.embed                  -> talker.model.text_embedding:out
    tlk.L*.ln1                 -> talker.model.layers.{1}.input_layernorm:out     # glob: {1} = first *
    tlk.L*.mlp                 -> talker.model.layers.{1}.mlp:out, talker.model.layers.{1}.mlp.down_proj:out
    re:^dec\\.B(\\d+)\\.in$       -> speech_tokenizer.decoder.decoder.{1}:in         # regex: {1} = group 1
    scratch.*                  -> -                                               # "-": ignore these keys

Globs use ``fnmatch`` syntax where each ``*`` / ``?`` is a capture; a ``re:`` pattern is a Python regex matched
against the whole key (named groups are available as ``{name}``). Several comma-separated targets judge one port
tensor as several of our taps (upstream records one tensor under nested modules: ``mlp.down_proj:out`` is
``mlp:out``). A ``@step_N`` suffix on a key is split off before matching and put back after renaming, unless the
target itself says ``@step_…``. A key no rule matches is kept as written (it may already be our name). ``.json``
map files hold the same rules as a list:
``[{"glob": "tlk.embed", "to": "talker.model.text_embedding:out"}, {"regex": "…", "to": "…"}]``.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
STEP_RE = re.compile(r"^(?P<base>.*)@step_(?P<step>\d+)$")
IGNORE = "-"


class PortInputError(Exception):
    """A dump, map file or option that cannot be read; the message is one line naming the file/key/value."""


# ------------------------------------------------------------------------------------------ map rules


@dataclass(frozen=True)
class MapRule:
    pattern: str  # as written (for messages)
    regex: re.Pattern
    target: str  # "-" = ignore
    where: str  # "map.txt:3"

    def apply(self, key: str) -> list[str] | None:
        """Our name(s) for ``key`` (several when one port tensor is several taps), ``["-"]`` to ignore it, or
        None when the rule does not match."""
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        if self.target == IGNORE:
            return [IGNORE]
        groups = {str(i + 1): g or "" for i, g in enumerate(m.groups())} | {
            k: v or "" for k, v in m.groupdict().items()}
        try:
            out = re.sub(r"\{(\w+)\}", lambda g: groups[g.group(1)], self.target)
            return [t.strip() for t in out.split(",")]
        except KeyError as e:
            raise PortInputError(f"{self.where}: target {self.target!r} names capture {{{e.args[0]}}}, "
                                 f"but pattern {self.pattern!r} has {len(m.groups())} capture(s)") from None


def _glob_regex(glob: str) -> str:
    """fnmatch syntax with each ``*`` and ``?`` turned into a capture group (so targets can say ``{1}``)."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if c == "*":
            out.append("(.*?)")
        elif c == "?":
            out.append("(.)")
        elif c == "[":
            j = glob.find("]", i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                out.append(fnmatch.translate(glob[i:j + 1])[4:-3])  # the class, without fnmatch's wrapper
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _rule(pattern: str, target: str, where: str) -> MapRule:
    pattern, target = pattern.strip(), target.strip()
    if not pattern or not target:
        raise PortInputError(f"{where}: a rule needs a pattern and a target ('PATTERN -> TARGET')")
    for t in target.split(","):
        if target != IGNORE and ":" not in t.split("@", 1)[0]:
            raise PortInputError(f"{where}: target {t.strip()!r} is not a tap name (<module path>:<point>) or '-'")
    src = pattern[3:] if pattern.startswith("re:") else _glob_regex(pattern)
    try:
        rx = re.compile(src)
    except re.error as e:
        raise PortInputError(f"{where}: bad pattern {pattern!r} ({e})") from None
    return MapRule(pattern, rx, target, where)


def load_map(path: str | Path) -> list[MapRule]:
    """Read a ``--map`` file (text rules, or a JSON list when the name ends in ``.json``)."""
    p = Path(path)
    if not p.is_file():
        raise PortInputError(f"{p}: map file not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    rules: list[MapRule] = []
    if p.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise PortInputError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(items, list):
            raise PortInputError(f"{p}: expected a JSON list of {{'glob'|'regex': …, 'to': …}} rules")
        for i, it in enumerate(items):
            where = f"{p}[{i}]"
            if not isinstance(it, dict) or "to" not in it or ("glob" in it) == ("regex" in it):
                raise PortInputError(f"{where}: each rule is {{'glob': PATTERN, 'to': TARGET}} or "
                                     f"{{'regex': PATTERN, 'to': TARGET}}")
            pat = it["glob"] if "glob" in it else "re:" + it["regex"]
            rules.append(_rule(str(pat), str(it["to"]), where))
        return rules
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not line:
            continue
        if "->" not in line:
            raise PortInputError(f"{p}:{n}: expected 'PATTERN -> TARGET', got {line!r}")
        pat, tgt = line.rsplit("->", 1)
        rules.append(_rule(pat, tgt, f"{p}:{n}"))
    return rules


def map_key(key: str, rules: list[MapRule]) -> list[str]:
    """Our name(s) for a port's ``key`` (``["-"]`` when a rule ignores it); the ``@step_N`` suffix survives."""
    m = STEP_RE.match(key)
    base, suffix = (m.group("base"), f"@step_{m.group('step')}") if m else (key, "")
    for r in rules:
        out = r.apply(base)
        if out is None:
            continue
        if out == [IGNORE]:
            return out
        return [t if "@step_" in t else t + suffix for t in out]
    return [key]


# ------------------------------------------------------------------------------------------ the dump


@dataclass
class Dump:
    """A port's tensors under our tap names: ``taps[name]`` is the list of calls in call order."""

    path: Path
    fmt: str
    taps: dict[str, list[torch.Tensor]]
    stored_dtype: dict[str, str]  # the dtype as the file held it (before any upcast)
    renamed: dict[str, str] = field(default_factory=dict)  # port key -> our name (keys a rule changed)
    ignored: list[str] = field(default_factory=list)  # port keys a "-" rule dropped
    problems: list[str] = field(default_factory=list)  # one line per key that could not be used, by name
    notes: list[str] = field(default_factory=list)  # dtype decisions said out loud


def _sniff(path: Path) -> str:
    if not path.exists():
        raise PortInputError(f"{path}: file not found")
    if path.is_dir():
        return "npy"
    size = path.stat().st_size
    if size == 0:
        raise PortInputError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(HDF5_MAGIC):
        return "hdf5"
    if head.startswith(ZIP_MAGIC):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        raise PortInputError(f"{path}: a single .npy array; put one .npy per tap in a folder and pass the folder")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    raise PortInputError(f"{path}: unknown dump format (expected our HDF5 schema, .safetensors, .npz, "
                         f"or a folder of .npy files)")


def _np_to_torch(arr: np.ndarray, key: str, path: Path) -> torch.Tensor:
    if arr.dtype.kind == "V" and arr.dtype.itemsize == 2:
        # numpy has no bf16; ml_dtypes-style bf16 arrays arrive as 2-byte opaque values: read them as bf16 bits.
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint16)).view(torch.bfloat16)
    if arr.dtype.kind not in "biuf":
        raise PortInputError(f"{path}: {key!r} has dtype {arr.dtype} (not a number type)")
    if arr.dtype == np.uint16 or arr.dtype == np.uint32 or arr.dtype == np.uint64:
        arr = arr.astype(np.int64)  # torch lacks most unsigned types; ids fit in int64
    return torch.from_numpy(np.ascontiguousarray(arr))


def _read_raw(path: Path, fmt: str) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """(key, tensor) pairs in file order, plus per-key problems (unreadable entries)."""
    problems: list[str] = []
    out: list[tuple[str, torch.Tensor]] = []
    if fmt == "hdf5":
        from reference_export.h5io import ReferenceError_, RefFile

        try:
            f = RefFile(path)
        except ReferenceError_ as e:
            raise PortInputError(str(e)) from None
        with f:
            for name in sorted(f.names(), key=lambda n: (f.order(n), n)):
                steps = f.tap_steps(name)
                if len(steps) == 1:
                    out.append((name, steps[0]))
                else:
                    out += [(f"{name}@step_{i}", t) for i, t in enumerate(steps)]
        return out, problems
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            # A valid safetensors header states its own length; a truncated file fails here with a reason.
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
            if n > path.stat().st_size:
                raise PortInputError(f"{path}: not a readable safetensors file (header says {n} bytes, "
                                     f"file has {path.stat().st_size}: truncated?)")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise PortInputError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        return list(tensors.items()), problems
    if fmt == "npz":
        try:
            z = np.load(path, allow_pickle=False)
            keys = list(z.files)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise PortInputError(f"{path}: not a readable .npz file ({e})") from None
        for k in keys:
            try:
                out.append((k, _np_to_torch(z[k], k, path)))
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                problems.append(f"{k}: unreadable in {path.name} ({e})")
            except PortInputError as e:
                problems.append(str(e))
        return out, problems
    files = sorted(path.glob("*.npy"))
    if not files:
        raise PortInputError(f"{path}: folder holds no .npy files")
    for fp in files:
        key = fp.name[: -len(".npy")]
        if ":" not in key and "__" in key:
            head, _, point = key.rpartition("__")  # the ':'-free spelling: <module>__<point>
            key = f"{head}:{point}"
        try:
            out.append((key, _np_to_torch(np.load(fp, allow_pickle=False), key, fp)))
        except (ValueError, OSError, EOFError) as e:
            problems.append(f"{key}: unreadable file {fp.name} ({str(e).splitlines()[0]})")
        except PortInputError as e:
            problems.append(str(e))
    return out, problems


def load_dump(path: str | Path, rules: list[MapRule] | None = None) -> Dump:
    """Read a dump, rename its keys by ``rules`` and group ``@step_N`` keys into per-call lists."""
    path = Path(path)
    fmt = _sniff(path)
    raw, problems = _read_raw(path, fmt)
    rules = rules or []
    steps: dict[str, dict[int, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    dump = Dump(path, fmt, {}, {}, problems=problems)
    origin: dict[str, str] = {}
    pairs = []
    for key, t in raw:
        names = map_key(key, rules)
        if names == [IGNORE]:
            dump.ignored.append(key)
            continue
        if names != [key]:
            dump.renamed[key] = ", ".join(names)
        pairs += [(key, name, t) for name in names]
    for key, name, t in pairs:
        m = STEP_RE.match(name)
        base = m.group("base") if m else name
        if ":" not in base:
            dump.problems.append(f"{key}: not a tap name (<module path>:<point>); rename it with --map")
            continue
        dtype = str(t.dtype).replace("torch.", "")
        if m:
            i = int(m.group("step"))
            if i in steps.setdefault(base, {}):
                dump.problems.append(f"{key}: a second tensor for {base}@step_{i} (first from {origin[name]})")
                continue
            steps[base][i] = t
        else:
            if name in plain:
                dump.problems.append(f"{key}: a second tensor for {name} (first from {origin[name]})")
                continue
            plain[name] = t
        origin[name] = key
        dump.stored_dtype.setdefault(base, dtype)
    for name in plain:
        if name in steps:
            dump.problems.append(f"{name}: written both plain and per call (@step_N); keep one")
            continue
        dump.taps[name] = [plain[name]]
    for base, by_step in steps.items():
        if base in plain:
            continue
        want = list(range(len(by_step)))
        have = sorted(by_step)
        if have != want:
            # The first missing call, found in the keys themselves: a step number is the user's (a typo like
            # @step_100000000 must not make us build a range of 10⁸ before saying so).
            gap = next(i for i, n in enumerate(have) if n != i)
            dump.problems.append(f"{base}: calls @step_{have[0]}..@step_{have[-1]} with "
                                 f"@step_{gap} missing (steps count calls from 0)")
            continue
        dump.taps[base] = [by_step[i] for i in want]
    low = sorted({d for d in dump.stored_dtype.values() if d in ("bfloat16", "float16")})
    if low:
        n = sum(d in low for d in dump.stored_dtype.values())
        dump.notes.append(f"{n} tap(s) stored as {'/'.join(low)}: upcast exactly to float32 and compared in float32 "
                          f"against the reference (the error then includes the port's own rounding)")
    return dump
