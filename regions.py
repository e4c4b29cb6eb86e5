"""The region objectives of a run from its flags: --region / --region_mask NAME=COLUMN, or the default hand and
face columns; their order is the objectives' order (losses, weights, logs, checkpoints)."""

from __future__ import annotations

import argparse
import logging
import math

import fairhuman_utils as fh

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


class RegionAction(argparse.Action):
    """``--region`` / ``--region_mask NAME=COLUMN``: appends ``(kind, "NAME=COLUMN")`` to ``args.region_specs``,
    both flags in one list so that their command-line order is the objectives' order (checked by
    :func:`region_sources`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        specs = list(getattr(namespace, self.dest, None) or [])
        specs.append((self.const, values))
        setattr(namespace, self.dest, specs)


DEFAULT_REGION_COLUMNS = {"hand_box_column": "hand_boxes", "face_box_column": "face_boxes", "hand_mask_column": None,
                          "face_mask_column": None}
"""The hand/face column flags and their defaults: they describe the regions only without --region/--region_mask."""


def region_sources(args) -> list[tuple[str, str, str]]:
    """``(region, 'boxes' | 'mask', column)`` per region objective, in the objectives' order. Derived once, by
    the training script's ``parse_args``, which keeps it as ``args.regions`` (read by everything after it).

    With ``--region NAME=COLUMN`` / ``--region_mask NAME=COLUMN``: those, in the order given (a malformed
    spec, an empty name or column, a duplicate name or the name "global" is a :class:`UsageError` naming the
    flag). Without them: hand and face from the hand/face column flags, exactly as before named regions.
    """
    if not getattr(args, "region_specs", None):
        return [
            ("hand", "mask", args.hand_mask_column) if args.hand_mask_column else ("hand", "boxes", args.hand_box_column),
            ("face", "mask", args.face_mask_column) if args.face_mask_column else ("face", "boxes", args.face_box_column),
        ]
    sources = []
    for kind, spec in args.region_specs:
        flag = "--region" if kind == "boxes" else "--region_mask"
        name, equals, column = str(spec).partition("=")
        name, column = name.strip(), column.strip()
        if not equals or not name or not column:
            raise UsageError(f"{flag} {spec!r}: expected NAME=COLUMN, e.g. {flag} text=text_boxes")
        if not fh.REGION_NAME.fullmatch(name):
            raise UsageError(f"{flag} {spec!r}: the region name {name!r} must be letters, digits, '_' or '-', "
                             "starting with a letter (it names the logs loss/NAME and weight/NAME)")
        if name == fh.GLOBAL_OBJECTIVE:
            raise UsageError(f"{flag} {spec!r}: the region name 'global' clashes with the global objective; "
                             "choose another name")
        if name in ("image", "overlay"):
            raise UsageError(f"{flag} {spec!r}: the region name {name!r} is taken by the mask previews' "
                             f"{{i}}_{name}.png; choose another name")
        if any(name == other for other, _, _ in sources):
            raise UsageError(f"{flag} {spec!r}: region name {name!r} is given twice; every region needs its own name")
        sources.append((name, kind, column))
    return sources


def region_flag(args, region: str, kind: str, column: str, with_column: bool = True) -> str:
    """The flag that gives ``region`` (``kind`` 'boxes' or 'mask') its ``column``, as the user types it, for
    messages: ``--region NAME=COLUMN`` / ``--region_mask NAME=COLUMN`` with named regions, else
    ``--{region}_box_column`` / ``--{region}_mask_column``, followed by the column with ``with_column``."""
    if args.region_specs:
        return f"--{'region' if kind == 'boxes' else 'region_mask'} {region}={column}"
    flag = f"--{region}_{'mask' if kind == 'mask' else 'box'}_column"
    return f"{flag} {column}" if with_column else flag


def run_objectives(args) -> tuple[str, ...]:
    """The run's objectives, ``("global", *regions)``: the order of losses, weights, logs and checkpoints."""
    return fh.objective_names([name for name, _, _ in args.regions])


def region_loss_weights(args) -> tuple[float, ...]:
    """The static weight of each region's loss (``--weighting equal``), in the objectives' order:
    ``--region_loss_weight NAME=W``, or ``--hand_loss_weight`` / ``--face_loss_weight`` for the regions named
    hand and face, else 1. Raises :class:`UsageError` naming the flag for a malformed or unknown entry."""
    names = [name for name, _, _ in args.regions]
    weights = {}
    for spec in args.region_loss_weight or []:
        name, equals, value = str(spec).partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not equals or weight is None:
            raise UsageError(f"--region_loss_weight {spec!r}: expected NAME=W with a number W, e.g. text=0.5")
        if name not in names:
            raise UsageError(f"--region_loss_weight {spec!r}: no region named {name!r} (the regions: {', '.join(names)})")
        if name in weights:
            raise UsageError(f"--region_loss_weight: region {name!r} is given twice")
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"--region_loss_weight {spec!r}: the weight must be a finite number, not negative")
        weights[name] = weight
    for name in ("hand", "face"):
        flag_value = getattr(args, f"{name}_loss_weight")
        if flag_value == 1.0:
            continue
        if name not in names:
            raise UsageError(f"--{name}_loss_weight: this run has no region named {name} (the regions: {', '.join(names)}); "
                             "use --region_loss_weight NAME=W")
        if name in weights:
            raise UsageError(f"--{name}_loss_weight and --region_loss_weight {name}=... both weight the {name} region; "
                             "give one")
        weights[name] = flag_value
    return tuple(weights.get(name, 1.0) for name in names)


def check_regions(args) -> None:
    """The region flags beyond their own form (checked by :func:`region_sources` while the arguments are parsed):
    the hand/face column flags not mixed with --region/--region_mask, and the static region weights
    (:func:`region_loss_weights`)."""
    sources = args.regions
    if args.region_specs:
        mixed = [f"--{flag}" for flag, default in DEFAULT_REGION_COLUMNS.items() if getattr(args, flag) != default]
        if mixed:
            raise UsageError(f"{', '.join(mixed)} describe the default hand/face regions, which --region/--region_mask "
                             "replace: name every region with --region NAME=COLUMN or --region_mask NAME=COLUMN")
        if args.relative_boxes and all(kind == "mask" for _, kind, _ in sources):
            raise UsageError("--relative_boxes has no effect when every region is given with --region_mask")
    if args.region_loss_weight and args.weighting != "equal":
        raise UsageError(f"--region_loss_weight sets the static weights of --weighting equal; --weighting {args.weighting} "
                         + ("chooses the weights itself" if args.weighting == "fair" else "does not use the regions"))
    region_loss_weights(args)
