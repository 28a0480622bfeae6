"""Import a whole LoRA bank at once: one sub-folder per effect, each with its pairs, its teacher prompt
and, if the curator has one, the effect's existing LoRA::

    bank/
        warm-film/
            pairs/ (or pairs.zip)   any layout ``read_pairset`` accepts
            prompt.txt              the teacher prompt (the instruction the LoRA was trained with)
            warm_film_v3.safetensors   optional: imported as the effect's teacher (with several, the
                                       one named like the folder, as ai-toolkit names its final save)
        neon-glow/
            ...

Every effect is checked on its own: a folder with a problem is skipped with the reason and the others
are imported, so one broken folder never costs the rest. Effects already in the library are left alone.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from distill.backbones.base import Backbone

from . import library, teachers_service
from .context import Studio
from .library import LibraryError
from .pairsets import PairSetError

PROMPT_FILE = "prompt.txt"
PAIRS = ("pairs", "pairs.zip")
MAX_ZIP_BYTES = 4 * 2**30  # a bank uploaded as one zip, unpacked (real LoRAs are ~0.8 GB each: use a folder)


class BankError(ValueError):
    """The bank as a whole cannot be read (not a folder, no effect folders)."""


@dataclass(frozen=True)
class BankEntry:
    """One effect folder of a bank, as found (nothing imported yet)."""

    name: str
    folder: Path
    pairs: Path | None
    prompt: str
    lora: Path | None
    problem: str = ""  # why it cannot be imported, "" when it can


@dataclass
class BankResult:
    imported: list[str] = field(default_factory=list)  # effects added to the library
    teachers: list[str] = field(default_factory=list)  # of those, the ones whose LoRA became the teacher
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (folder, why): nothing was imported
    notes: list[tuple[str, str]] = field(default_factory=list)  # (effect, what to know): imported anyway


def _entry(folder: Path) -> BankEntry:
    name = library.slugify(folder.name)
    pairs = next((folder / p for p in PAIRS if (folder / p).exists()), None)
    prompt_path = folder / PROMPT_FILE
    prompt = ""
    problems = []
    if prompt_path.is_file():
        try:
            prompt = " ".join(prompt_path.read_text(encoding="utf-8").split())
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{PROMPT_FILE} cannot be read as text ({e})")
    loras = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".safetensors")
    try:
        library.check_name(name)
    except LibraryError as e:
        problems.append(str(e))
    if pairs is None:
        problems.append("no pairs/ folder or pairs.zip with its training pairs")
    if len(loras) > 1:
        # ai-toolkit keeps step checkpoints (name_000001000.safetensors) beside the final name.safetensors
        final = [p for p in loras if p.stem.lower() == folder.name.lower()]
        if len(final) == 1:
            loras = final
        else:
            problems.append(
                f"{len(loras)} .safetensors files ({', '.join(p.name for p in loras)}); keep the one teacher, "
                "or name it like the folder"
            )
    if loras and not prompt:
        problems.append(f"a LoRA but no {PROMPT_FILE} with the instruction it was trained with")
    return BankEntry(name, folder, pairs, prompt, loras[0] if loras else None, "; ".join(problems))


def scan_bank(root: Path) -> list[BankEntry]:
    """Every effect folder under ``root`` (hidden folders left out), sorted by name, case aside."""
    root = Path(root)
    if not root.is_dir():
        raise BankError(f"{root} is not a folder: give the folder that holds one sub-folder per effect.")
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))),
        key=lambda p: (p.name.lower(), p.name),
    )
    if not folders:
        raise BankError(
            f"{root} holds no effect folders: put each effect in its own sub-folder "
            f"(pairs/ or pairs.zip, {PROMPT_FILE}, and its .safetensors LoRA if it has one)."
        )
    entries = []
    for f in folders:
        try:
            entries.append(_entry(f))
        except OSError as e:  # a folder we may not list: that effect only
            entries.append(
                BankEntry(library.slugify(f.name), f, None, "", None, f"cannot be read ({e.strerror or e})")
            )
    seen: dict[str, str] = {}
    out = []
    for e in entries:  # two folders that slugify alike ("Warm Film", "warm-film") would be one effect
        if e.name in seen and not e.problem:
            e = replace(e, problem=f"the same effect name as the folder {seen[e.name]}")
        seen.setdefault(e.name, e.folder.name)
        out.append(e)
    return out


def unpack_bank_zip(
    path: Path, dest: Path, max_bytes: int = MAX_ZIP_BYTES, max_entries: int = 20_000
) -> Path:
    """Unpack a bank uploaded as one .zip into ``dest`` (bounded in size and entries; zipfile keeps every
    name inside ``dest``) and return the folder that holds the effect folders (one wrapping folder, as a
    zipped ``bank/`` has, is looked through)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise BankError(f"{Path(path).name} is not a readable .zip ({e}).") from e
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if len(infos) > max_entries:
            raise BankError(f"The bank zip holds {len(infos)} files, more than the {max_entries} allowed.")
        if sum(i.file_size for i in infos) > max_bytes:
            raise BankError(
                f"The bank zip unpacks to more than {max_bytes // 2**30} GB; import it as a folder."
            )
        written = 0
        for info in infos:
            target = Path(zf.extract(info, dest))  # drops "..", drive letters and leading slashes
            written += target.stat().st_size
            if written > max_bytes:  # a header that lied about its size
                raise BankError(
                    f"The bank zip unpacks to more than {max_bytes // 2**30} GB; import it as a folder."
                )
    root = Path(dest)
    inner = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))]
    if len(inner) == 1 and not any((inner[0] / n).exists() for n in (*PAIRS, PROMPT_FILE)):
        root = inner[0]
    return root


def import_bank(
    studio: Studio,
    root: Path,
    on_effect: Callable[[int, int, str], None] | None = None,
    backbone: Backbone | None = None,
) -> BankResult:
    """Import every effect folder of the bank at ``root`` (see the module docstring); ``on_effect(i, n,
    name)`` before each. LoRAs are checked on ``backbone`` (the studio's shared one in the UI); without
    one, a backbone is loaded once, and only if some folder holds a LoRA."""
    entries = scan_bank(root)
    existing = {e.name for e in library.list_effects(studio)}
    result = BankResult()
    for i, e in enumerate(entries):
        if on_effect:
            on_effect(i, len(entries), e.name)
        if e.problem:
            result.skipped.append((e.folder.name, e.problem))
            continue
        if e.name in existing:
            result.skipped.append((e.folder.name, f"'{e.name}' is already in the library (left as it is)"))
            continue
        try:
            imported = library.import_pairset(studio, e.name, e.pairs, teacher_prompt=e.prompt)
        except PairSetError as err:
            result.skipped.append((e.folder.name, "its pairs: " + "; ".join(err.problems)))
            continue
        except LibraryError as err:
            result.skipped.append((e.folder.name, str(err)))
            continue
        result.imported.append(e.name)
        result.notes += [(e.name, w) for w in imported.warnings]
        if e.lora is None:
            continue
        backbone = backbone or teachers_service.open_backbone(studio)
        try:
            teachers_service.import_teacher(studio, e.name, e.lora, backbone=backbone)
            result.teachers.append(e.name)
        except (teachers_service.TeacherError, LibraryError) as err:
            result.notes.append(
                (e.name, f"imported without its teacher: {err} Train one in Teachers instead.")
            )
    return result
