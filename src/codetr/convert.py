"""Official Co-DINO (mmdet-3 port or original Sense-X repo) or Co-Deformable-DETR (Sense-X repo) checkpoint ->
codetr checkpoint.

    python -m codetr.convert SRC.pth DST.ckpt [--num-classes K] [--expected TABLE] [--recipe EXPERIMENT
        [--override key=value ...] [--class-names FILE]]

Reads ``SRC`` with ``torch.load(weights_only=True)`` (a pickle with code is refused, naming the file), takes the
state dict out of ``{"state_dict": ...}`` (``meta`` / ``optimizer`` / ``message_hub`` ignored) or a bare dict,
strips ``module.``, ignores ``ema_*`` buffers (EMA-hook copies; the main weights of those files already are the EMA
weights), renames every key into codetr naming and writes
``{"state_dict": {"detector." + key: tensor}, "codetr_meta": {...}}``.

Renaming (everything else is identical to mmdet):

* query head transformer layers (mmcv ``BaseTransformerLayer`` -> our layers): ``encoder.layers.N.attentions.0.X``
  -> ``self_attn.X``; ``decoder.layers.N.attentions.0.attn.X`` -> ``self_attn.X`` (``nn.MultiheadAttention``, packed
  q/k/v kept packed); ``decoder.layers.N.attentions.1.X`` -> ``cross_attn.X``; ``ffns.0.layers.0.0`` -> ``ffn.fc1``;
  ``ffns.0.layers.1`` -> ``ffn.fc2``; ``norms.{0,1,2}`` -> ``norm{1,2,3}``;
* ``query_head.label_embedding.weight`` (original repo) -> ``query_head.dn_generator.label_embedding.weight``;
* Swin backbones in mmdet or original naming -> ours (:mod:`codetr.models.backbones.swin`, incl. the
  patch-merging channel order); ResNet and ViT backbone keys are already ours (the ViT's stored RoPE tables
  ``rope_win`` / ``rope_glb`` / ``blocks.N.attn.rope`` are ignored: ours are computed).

Every key is accounted for: keys that no rule knows, and (with an expected ``key -> shape`` table, e.g. a model's
``state_dict()``) keys absent from the table, missing expected keys and shape mismatches raise
:class:`ConversionError` listing them. With ``num_classes`` different from the checkpoint's, the class-dependent
tensors (``cls_branches``, DN label embedding, ATSS ``atss_cls``, RoI ``fc_cls`` / ``fc_reg``) are dropped and listed
(the model keeps its fresh initialisation for them; see :func:`codetr.checkpoint_io.load_detector_weights`).

With ``--recipe`` the output also describes its model (``codetr_model``: the recipe's detector config, test
resizing, normalisation and the class names of ``--class-names``, a text file with one name per line or a JSON
list), so that :class:`codetr.inference.Detector` and ``python -m codetr.export`` can rebuild it without Hydra; the
recipe's model is built and the converted weights are checked against it. ``SRC`` may also be a codetr checkpoint
written before checkpoints carried that description (its EMA weights preferred): it is copied with one added.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from codetr.checkpoint_io import (
    PREFIX,
    CheckpointMismatchError,
    check_against,
    detector_state,
    is_class_dependent,
    load_weights_file,
    num_classes_of,
    unwrap_state_dict,
)
from codetr.models.backbones.swin import swin_naming, swin_to_codetr

log = logging.getLogger(__name__)
# ATSS ``Scale`` multipliers: 0-d in the reference, (1,) in codetr (FSDP2 cannot shard 0-d parameters).
_SCALAR_TO_1D = r"bbox_head\.\d+\.scales\.\d+\.scale"
TOP_LEVEL = ("backbone.", "neck.", "query_head.", "rpn_head.", "roi_head.", "bbox_head.", "mask_branch.")

_ATTN = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_MHA = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_WB = r"(weight|bias)"
_ENC = r"query_head\.transformer\.encoder\.layers\.(\d+)\."
_DEC = r"query_head\.transformer\.decoder\.layers\.(\d+)\."
# (mmdet / original pattern, codetr replacement)
RENAME_RULES: list[tuple[str, str]] = [
    (_ENC + r"attentions\.0\." + _ATTN, r"query_head.transformer.encoder.layers.\1.self_attn.\2.\3"),
    (_ENC + r"ffns\.0\.layers\.0\.0\." + _WB, r"query_head.transformer.encoder.layers.\1.ffn.fc1.\2"),
    (_ENC + r"ffns\.0\.layers\.1\." + _WB, r"query_head.transformer.encoder.layers.\1.ffn.fc2.\2"),
    (_ENC + r"norms\.0\." + _WB, r"query_head.transformer.encoder.layers.\1.norm1.\2"),
    (_ENC + r"norms\.1\." + _WB, r"query_head.transformer.encoder.layers.\1.norm2.\2"),
    (_DEC + r"attentions\.0\.attn\." + _MHA, r"query_head.transformer.decoder.layers.\1.self_attn.\2"),
    (_DEC + r"attentions\.1\." + _ATTN, r"query_head.transformer.decoder.layers.\1.cross_attn.\2.\3"),
    (_DEC + r"ffns\.0\.layers\.0\.0\." + _WB, r"query_head.transformer.decoder.layers.\1.ffn.fc1.\2"),
    (_DEC + r"ffns\.0\.layers\.1\." + _WB, r"query_head.transformer.decoder.layers.\1.ffn.fc2.\2"),
    (_DEC + r"norms\.0\." + _WB, r"query_head.transformer.decoder.layers.\1.norm1.\2"),
    (_DEC + r"norms\.1\." + _WB, r"query_head.transformer.decoder.layers.\1.norm2.\2"),
    (_DEC + r"norms\.2\." + _WB, r"query_head.transformer.decoder.layers.\1.norm3.\2"),
    (r"query_head\.label_embedding\.weight", r"query_head.dn_generator.label_embedding.weight"),
    # Co-DINO-Inst: the detector-level mask head and mask-IoU head live in codetr's mask branch
    (r"mask_head\.(.+)", r"mask_branch.mask_head.\1"),
    (r"mask_iou_head\.(.+)", r"mask_branch.mask_iou_head.\1"),
]
# Keys of our query head (after renaming); other top-level modules keep mmdet's names and are accepted as-is.
QUERY_HEAD_KEYS = [
    _ENC + r"self_attn\." + _ATTN,
    _ENC + r"(ffn\.fc[12]|norm[12])\." + _WB,
    _DEC + r"self_attn\." + _MHA,
    _DEC + r"cross_attn\." + _ATTN,
    _DEC + r"(ffn\.fc[12]|norm[123])\." + _WB,
    r"query_head\.transformer\.decoder\.(norm|ref_point_head\.\d+)\." + _WB,
    r"query_head\.transformer\.(level_embeds|query_embed\.weight)",
    r"query_head\.transformer\.(enc_output|enc_output_norm|aux_pos_trans\.\d+|aux_pos_trans_norm\.\d+)\." + _WB,
    r"query_head\.(cls_branches\.\d+|reg_branches\.\d+\.\d+|downsample\.\d+)\." + _WB,
    r"query_head\.dn_generator\.label_embedding\.weight",
    # Co-Deformable-DETR: head-owned content queries, the selected boxes' position projection, and per auxiliary
    # branch the candidate-feature projection and the (scalar) branch embedding
    r"query_head\.query_embedding\.weight",
    r"query_head\.transformer\.(pos_trans|pos_trans_norm|pos_feats_trans\.\d+|pos_feats_norm\.\d+)\." + _WB,
    r"query_head\.transformer\.head_pos_embed\.weight",
]
MMCV_LEFTOVERS = (".attentions.", ".ffns.", ".norms.")


class ConversionError(CheckpointMismatchError):
    """A checkpoint key could not be mapped, or the result does not match the expected table."""


@dataclass
class Conversion:
    state_dict: dict[str, Tensor]
    renamed: dict[str, str] = field(default_factory=dict)  # source key -> our key (only keys that changed)
    ignored: list[str] = field(default_factory=list)  # ema_* buffers, Swin index buffers / classifier parts
    dropped_class_dependent: list[str] = field(default_factory=list)
    source_num_classes: int | None = None
    backbone_naming: str = "identity"


def _class_agnostic_reg(key: str, state: Mapping[str, Tensor], num_classes: int | None) -> bool:
    """True for the ``fc_reg`` of a class-agnostic RoI box head (4 outputs whatever K is; kept on a class change).

    With K = 1 a class-specific regressor also has 4 outputs; it is then treated as class-dependent.
    """
    return key.endswith((".fc_reg.weight", ".fc_reg.bias")) and state[key].shape[0] == 4 and num_classes != 1


def codetr_shape(key: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape in codetr's layout of tensor ``key`` (codetr naming): the reference's 0-d ATSS scales are (1,)."""
    return (1,) if len(shape) == 0 and re.fullmatch(_SCALAR_TO_1D, key) else tuple(shape)


def to_codetr_layout(key: str, value: Tensor) -> Tensor:
    """``value`` reshaped to :func:`codetr_shape` (a view; values unchanged)."""
    return value.reshape(codetr_shape(key, value.shape))


def rename_key(key: str) -> str:
    """Our name of one mmdet / original key (identity for keys outside the rename rules)."""
    for pattern, repl in RENAME_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return key


def _known(key: str) -> bool:
    if not key.startswith(TOP_LEVEL):
        return False
    if key.startswith("query_head."):
        return any(re.fullmatch(p, key) for p in QUERY_HEAD_KEYS)
    return not any(tok in key for tok in MMCV_LEFTOVERS)


def convert_state_dict(
    state: Mapping[str, Tensor],
    expected: Mapping[str, Sequence[int] | torch.Size] | None = None,
    num_classes: int | None = None,
) -> Conversion:
    """Rename an official Co-DINO / Co-Deformable-DETR state dict (keys without ``module.``) into codetr naming.

    Args:
        state: mmdet-3 or original-repo state dict.
        expected: optional ``key -> shape`` of the target model (codetr naming, no ``detector.`` prefix).
        num_classes: target K; when it differs from the checkpoint's, class-dependent tensors are dropped.
    Raises:
        ConversionError: unmapped keys, keys absent from ``expected``, missing expected keys or shape mismatches.
    """
    out = Conversion(state_dict={}, source_num_classes=num_classes_of(state))
    backbone = {}
    unmapped = []
    for key, value in state.items():
        if key.startswith("ema_") or key.split(".")[-1].startswith("ema_"):
            out.ignored.append(key)
        elif key.startswith("backbone.") and re.search(r"(^|\.)rope(_win|_glb)?\.freqs_(cos|sin)$", key):
            out.ignored.append(key)  # original ViT: RoPE tables stored as buffers; ours are computed
        elif key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value
        else:
            new = rename_key(key)
            if not _known(new):
                unmapped.append(key)
                continue
            if new != key:
                out.renamed[key] = new
            out.state_dict[new] = to_codetr_layout(new, value)
    naming = swin_naming(backbone) if any("blocks." in k for k in backbone) else "identity"
    out.backbone_naming = naming if naming in ("mmdet", "original") else "identity"

    if naming in ("mmdet", "original"):
        converted, bad, ignored = swin_to_codetr(backbone)
        unmapped += [f"backbone.{k}" for k in bad]
        out.ignored += [f"backbone.{k}" for k in ignored]
    else:
        converted = backbone
    for key, value in converted.items():
        out.state_dict[f"backbone.{key}"] = value
    if unmapped:
        raise ConversionError(f"{len(unmapped)} checkpoint keys match no conversion rule: {', '.join(unmapped)}")
    if num_classes is not None and num_classes != out.source_num_classes:
        out.dropped_class_dependent = sorted(
            k for k in out.state_dict
            if is_class_dependent(k) and not _class_agnostic_reg(k, out.state_dict, out.source_num_classes)
        )
        for key in out.dropped_class_dependent:
            del out.state_dict[key]
    if expected is not None:
        expected = {k: codetr_shape(k, s) for k, s in expected.items()}
        try:
            check_against(out.state_dict, expected, allowed_missing=set(out.dropped_class_dependent))
        except CheckpointMismatchError as error:
            raise ConversionError(str(error)) from error
    return out


def read_expected_table(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``key -> shape`` from a TSV (``key<TAB>[shape]``, ``#`` comments), a JSON list of ``[key, shape, ...]`` /
    dict with ``state_dict`` holding such a list, or a JSON ``{key: shape}``. mmdet-named keys are renamed."""
    path = Path(path)
    table: dict[str, tuple[int, ...]] = {}
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, dict) and isinstance(data.get("state_dict"), list):
            data = data["state_dict"]
        items = data.items() if isinstance(data, dict) else ((row[0], row[1]) for row in data)
        table = {k: tuple(s) for k, s in items}
    else:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, shape = line.split("\t")[:2]
                table[key] = tuple(json.loads(shape))
    return {rename_key(k): codetr_shape(rename_key(k), s) for k, s in table.items()}


def source_state(raw: Mapping) -> dict[str, Tensor]:
    """The state dict to convert: an official checkpoint's, or a codetr checkpoint's detector (EMA preferred)."""
    containers = [raw.get(k) for k in ("ema_state_dict", "state_dict")]
    if any(isinstance(c, Mapping) and any(str(k).startswith(PREFIX) for k in c) for c in containers):
        return detector_state(raw, prefer_ema=True)
    return unwrap_state_dict(raw)


def convert_file(
    src: str | Path,
    dst: str | Path | None = None,
    num_classes: int | None = None,
    expected: Mapping[str, Sequence[int]] | None = None,
    description: Mapping | None = None,
) -> Conversion:
    """Read ``src`` safely, convert, and (with ``dst``) write the codetr checkpoint (with ``description``, the
    :class:`codetr.inference.ModelDescription` dict of its model, under ``codetr_model``)."""
    raw = load_weights_file(src)
    conversion = convert_state_dict(source_state(raw), expected=expected, num_classes=num_classes)
    if dst is not None:
        meta = {
            "source": str(src),
            "source_format": "original" if "query_head.label_embedding.weight" in conversion.renamed else "mmdet",
            "backbone_naming": conversion.backbone_naming,
            "num_classes": num_classes if num_classes is not None else conversion.source_num_classes,
            "source_num_classes": conversion.source_num_classes,
            "dropped_class_dependent": conversion.dropped_class_dependent,
            "ignored": conversion.ignored,
            "num_renamed": len(conversion.renamed),
        }
        state = {PREFIX + k: v.contiguous() for k, v in conversion.state_dict.items()}
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        checkpoint = {"state_dict": state, "codetr_meta": meta}
        if description is not None:
            checkpoint["codetr_model"] = dict(description)
        torch.save(checkpoint, dst)
    return conversion


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line (blank lines ignored)."""
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list):
            raise ValueError(f"{path}: expected a JSON list of class names")
        return [str(n) for n in names]
    return [line.strip() for line in text.splitlines() if line.strip()]


def recipe_description(recipe: str, overrides: Sequence[str], class_names_file: str | None,
                       num_classes: int | None) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """The description of ``recipe``'s model and its ``key -> shape`` table (to check the weights against)."""
    from codetr.inference.description import describe_recipe
    from codetr.inference.detector import build_model

    names = read_class_names(class_names_file) if class_names_file else None
    if names and num_classes is not None and len(names) != num_classes:
        raise ValueError(f"{class_names_file}: {len(names)} class names but --num-classes {num_classes}")
    description = describe_recipe(recipe, overrides, names, num_classes)
    model = build_model(description)
    return description.to_dict(), {k: tuple(v.shape) for k, v in model.state_dict().items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codetr.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="official mmdet-3 / original Co-DINO checkpoint (.pth)")
    parser.add_argument("dst", help="output codetr checkpoint (.ckpt)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="target number of classes; class-dependent tensors are dropped when it differs")
    parser.add_argument("--expected", default=None,
                        help="key/shape table to check against (TSV key<TAB>[shape] or JSON; mmdet or codetr names)")
    parser.add_argument("--recipe", default=None,
                        help="experiment whose model the weights are for (e.g. co_dino_r50_lsj_1x): stored with them")
    parser.add_argument("--override", action="append", default=[], help="config override for --recipe (repeatable)")
    parser.add_argument("--class-names", default=None, help="class names: text file (one per line) or JSON list")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    expected = read_expected_table(args.expected) if args.expected else None
    try:
        description = None
        if args.recipe:
            description, model_table = recipe_description(args.recipe, args.override, args.class_names,
                                                          args.num_classes)
            expected = expected or model_table
        conv = convert_file(args.src, args.dst, num_classes=args.num_classes, expected=expected,
                            description=description)
    except (ConversionError, ValueError, FileNotFoundError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}: {len(conv.state_dict)} tensors ({len(conv.renamed)} renamed, {len(conv.ignored)} "
          f"ignored, backbone naming: {conv.backbone_naming})")
    if conv.dropped_class_dependent:
        print(f"dropped {len(conv.dropped_class_dependent)} class-dependent tensors "
              f"({conv.source_num_classes} -> {args.num_classes} classes; re-initialised by the model): "
              + ", ".join(conv.dropped_class_dependent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
