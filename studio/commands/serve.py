"""edit, effects catalog, serve: using an exported CollectionLoRA file (no studio database needed).

    python -m studio edit --lora FILE --effect NAME INPUT... --out DIR [--steps 8 --seed 0]
    python -m studio edit --lora FILE --compose A B INPUT... --out DIR
    python -m studio effects --lora FILE            (same as: effects catalog --lora FILE)
    python -m studio serve --lora FILE [--host 127.0.0.1 --port 8188 --token T]
    python -m studio serve --bank DIR --lightning FILE          (the LoRA-bank baseline)

``effects`` is the library's command group (list/show/...); this module adds ``--lora FILE`` to it
and a ``catalog`` action, both listing what a CollectionLoRA file holds. Register this module after
``library`` in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..context import Studio

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _add_backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone", default=None, help="tiny or qwen-image-edit (default: the one the file names)"
    )
    p.add_argument("--model-path", default=None, help="backbone weights folder or hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the backbone's choice)")


def _add_lora(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--lora", type=Path, required=required, help="an exported CollectionLoRA .safetensors file"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("edit", help="apply an effect of a CollectionLoRA to images or folders of images")
    _add_lora(p, True)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--effect", help="effect name (see `effects --lora FILE`)")
    what.add_argument("--compose", nargs=2, metavar=("A", "B"), help="apply effect A, then effect B")
    what.add_argument("--instruction", help="a free instruction instead of a catalog effect")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-fuse", action="store_true", help="keep the LoRA unfused (slower; for debugging)")
    _add_backbone(p)
    p.set_defaults(handler=cmd_edit, needs_studio=False)

    p = sub.add_parser("serve", help="HTTP endpoint for a CollectionLoRA (or a LoRA bank baseline)")
    _add_lora(p, False)
    p.add_argument("--bank", type=Path, default=None, help="LoRA-bank baseline: folder of teacher LoRAs")
    p.add_argument("--lightning", type=Path, default=None, help="LoRA-bank baseline: the Lightning LoRA")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--token", default=None, help="access token (required off loopback)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--max-upload-mb", type=int, default=10)
    _add_backbone(p)
    p.set_defaults(handler=cmd_serve, needs_studio=False)

    eff = sub.choices.get("effects")
    if eff is not None:  # the library's group: add `--lora FILE` and a `catalog` action to it
        actions = next(a for a in eff._actions if isinstance(a, argparse._SubParsersAction))
        actions.required = False
        _add_lora(eff, False)
        eff.set_defaults(handler=cmd_effects_of, needs_studio=False)
        p = actions.add_parser("catalog", help="the effects inside a CollectionLoRA file")
        _add_lora(p, True)
        p.add_argument("--json", action="store_true", help="print the catalog as JSON")
        p.set_defaults(handler=cmd_effects_of, needs_studio=False)
        eff.add_argument("--json", action="store_true", help="with --lora: print the catalog as JSON")


def cmd_effects_of(args: argparse.Namespace, studio: Studio | None = None) -> int:
    import json

    from distill.export import read_catalog

    if getattr(args, "lora", None) is None:
        print("error: give an ACTION (list, show, ...) or --lora FILE", file=sys.stderr)
        return 2
    catalog = read_catalog(args.lora)
    if args.json:
        print(
            json.dumps({"template": catalog.composition_template, "effects": json.loads(catalog.to_json())})
        )
        return 0
    print(f"{args.lora.name}: {len(catalog.entries)} effects, backbone {catalog.backbone or '?'}, ", end="")
    print(f"rank {catalog.rank}, {catalog.student_steps} steps")
    for e in catalog.entries:
        print(f"{e.name}\t{e.trigger}\t{e.student_prompt}")
    return 0


def collect_inputs(paths: list[Path]) -> list[Path]:
    """Image files, folders searched recursively, in a stable order; missing paths are errors."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"The folder {p} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"No such file or folder: {p}")
    return out


def _output_names(inputs: list[Path], out: Path, tag: str) -> list[Path]:
    """<stem>.<tag>.png; a number is added where two inputs share a stem."""
    seen: dict[str, int] = {}
    names = []
    for f in inputs:
        n = seen.get(f.stem, 0)
        seen[f.stem] = n + 1
        names.append(out / (f"{f.stem}.{tag}.png" if n == 0 else f"{f.stem}-{n}.{tag}.png"))
    return names


def cmd_edit(args: argparse.Namespace, studio: Studio | None = None) -> int:
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    from distill.serving import CollectionEditor

    files = collect_inputs(args.inputs)
    editor = CollectionEditor.load(
        args.lora, args.backbone, args.model_path, fuse=not args.no_fuse, device=args.device
    )
    tag = args.effect or ("+".join(args.compose) if args.compose else "instruction")
    editor.plan(args.effect, args.compose, args.instruction)  # fail on a bad effect before any work
    args.out.mkdir(parents=True, exist_ok=True)
    targets = _output_names(files, args.out, tag.replace("/", "_"))
    nfe, seconds = 0, 0.0
    with tqdm(total=len(files), unit="img", desc=f"edit {tag}") as bar:
        for i in range(0, len(files), args.batch_size):
            chunk = files[i : i + args.batch_size]
            try:
                images = [Image.open(f).convert("RGB") for f in chunk]
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"Cannot read an input image: {e}") from e
            res = editor.edit(
                images,
                effect=args.effect,
                compose=args.compose,
                instruction=args.instruction,
                steps=args.steps,
                seed=args.seed + i,
                batch_size=args.batch_size,
            )
            for im, target in zip(res.images, targets[i : i + len(chunk)], strict=True):
                im.save(target)
            nfe, seconds = res.nfe, seconds + res.seconds
            bar.update(len(chunk))
    print(f"wrote {len(files)} images to {args.out} ({nfe} NFE each, {seconds:.2f} s sampling)")
    return 0


def cmd_serve(args: argparse.Namespace, studio: Studio | None = None) -> int:
    from distill.serving import CollectionEditor, LoraBankEditor

    from ..serve import ServeConfig, serve

    config = ServeConfig(
        host=args.host,
        port=args.port,
        token=args.token,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_bytes=args.max_upload_mb * 1024 * 1024,
    )
    config.check()  # refuse before loading a model
    if (args.lora is None) == (args.bank is None):
        raise ValueError("Give either --lora FILE (a CollectionLoRA) or --bank DIR --lightning FILE.")
    if args.lora is not None:
        editor = CollectionEditor.load(args.lora, args.backbone, args.model_path, device=args.device)
    else:
        editor = LoraBankEditor.load(
            args.bank, args.lightning, args.backbone or "tiny", args.model_path, device=args.device
        )
    serve(editor, config)
    return 0
