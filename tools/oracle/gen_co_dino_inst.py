"""Generate the Co-DINO-Inst (mask branch) oracle from the OFFICIAL Sense-X/Co-DETR code, on the CPU.

usage: python tools/oracle/gen_co_dino_inst.py OUT_DIR [--set key=value ...] [--no-r50-keys]

The model is the official ``projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco_instance.py`` shrunk to a
tiny size (ViT-L -> a 2-block ViT, every width and count below, ``SETTINGS``), random weights (``torch.manual_seed``
+ the detector's own ``init_weights``) whose constant tensors are perturbed, on 3 synthetic images of different
sizes (polygon masks; one image's masks are compressed RLE), and it records what the parity tests compare:

* ``tiny_outputs.pth["eval"]``: the query head's detections (soft-NMS, original-image pixels), the encoder pyramid
  the mask branch reads, per image the mask RoIs, every stage's mask logits, the boundary-refined final logits, the
  mask-IoU predictions, the pasted binary masks at the original image size and the mask scores;
* ``train_seeded`` (stock behaviour from a seed), ``train_det`` (``torch.randperm`` -> ``arange``) and
  ``train_det_empty_gt`` (as ``train_det``, one image's ground truth emptied): every loss term, per-parameter
  gradient norms, the CPU RNG state before the call and every random decision (RPN / mask / RoI sampler choices,
  RPN proposals, the query head's training detections that feed the mask branch, mask targets per stage, mask-IoU
  targets, positive-query targets).

Every value another reference may change is in ``SETTINGS`` (``--set embed=48 --set empty_image=0 ...``), and the
tests read everything they need from the records and ``tiny_config.json``, never from these constants.

Environment (not part of this repository): the Sense-X/Co-DETR tree at ``CODETR_ROOT`` (commit
26653521e47157fdd819e764b4bb949057ea9f3b, its vendored mmdet 2.25.3 on ``sys.path``) with mmcv 1.7.x importable;
mmcv's compiled ops (``mmcv._ext``: nms, softnms, roi_align) either built, or provided by a module ``fake_ext`` with
an ``install()`` function found in ``ORACLE_SCRIPTS`` (a CPU build of that op subset). The official Co-DINO modules
call ``.cuda()`` on small index tensors; an import hook compiles ``projects/models/co_dino_head.py`` and
``query_denoising.py`` with ``.cuda()`` -> ``.cpu()`` (files on disk untouched). Two threads, float32.

Run it twice in separate processes (e.g. ``PYTHONHASHSEED=3`` and ``=11``) and compare the data files' sha256
(``tools/oracle/compare_runs.py``): they must be byte-identical.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import warnings

warnings.filterwarnings("ignore")

SETTINGS = dict(
    # seeds
    seed_init=0, seed_perturb=1, seed_images=2, seed_train=1234, seed_train_other=999,
    # ViT (head width 64: the reference's global-block RoPE is hard-wired to 32 frequencies = head dim 64)
    vit_embed=64, vit_heads=1, vit_depth=2, vit_window=4, vit_window_blocks=[0], vit_pretrain_img=64,
    # neck / transformer / query head
    embed=32, heads=4, points=2, enc_layers=2, dec_layers=2, ffn=64, queries=20, dn_queries=10,
    num_classes=5, test_max_per_img=50, soft_nms_iou=0.8,
    # mask branch
    mask_channels=16, mask_semantic_convs=2, mask_stage_sizes=[6, 12, 24, 48], mask_iou_fc=32,
    mask_sampler_num=32, mask_sampler_pos_fraction=0.25,
    # auxiliary heads
    roi_fc=32, rpn_nms_pre=400, rpn_max_per_img=200, roi_sampler_num=64,
    # data
    empty_image=1, rle_image=1,
)

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--set", action="append", default=[], help="key=value (JSON value) overriding SETTINGS")
ap.add_argument("--full-keys", action="store_true",
                help="also write the state-dict key list of the full-size official ViT-L COCO / LVIS instance models "
                     "(vit_l_{coco,lvis}_instance_keys.json; builds them on the CPU, ~2 min, ~4 GB)")
args = ap.parse_args()
for item in args.set:
    key, value = item.split("=", 1)
    if key not in SETTINGS:
        raise SystemExit(f"unknown setting {key!r}; known: {sorted(SETTINGS)}")
    SETTINGS[key] = json.loads(value)
S = SETTINGS
OUT = args.out
os.makedirs(OUT, exist_ok=True)

CODETR = os.path.abspath(os.environ.get("CODETR_ROOT", "codetr"))
CONFIG = os.path.join(CODETR, "projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco_instance.py")
if not os.path.isfile(CONFIG):
    raise SystemExit(f"the Sense-X/Co-DETR tree was not found at {CODETR!r} (set CODETR_ROOT)")
sys.dont_write_bytecode = True
sys.path.insert(0, CODETR)

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

if os.environ.get("ORACLE_SCRIPTS"):
    sys.path.insert(0, os.environ["ORACLE_SCRIPTS"])
    import fake_ext  # noqa: E402  (provides mmcv._ext: compiled nms / softnms / roi_align)

    fake_ext.install()

CPU_PATCH = {"projects.models.co_dino_head": None, "projects.models.query_denoising": None}


class _CpuPatchLoader(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        path = self.get_filename(fullname)
        source = self.get_data(path).decode("utf-8")
        CPU_PATCH[fullname] = source.count(".cuda()") + source.count(".to('cuda')")
        source = source.replace(".cuda()", ".cpu()").replace(".to('cuda')", ".to('cpu')")
        return compile(source, path, "exec", dont_inherit=True)


class _CpuPatchFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in CPU_PATCH:
            return None
        filename = os.path.join(CODETR, *fullname.split(".")) + ".py"
        return importlib.util.spec_from_file_location(fullname, filename, loader=_CpuPatchLoader(fullname, filename))


sys.meta_path.insert(0, _CpuPatchFinder())

import mmcv  # noqa: E402

_version = mmcv.__version__
mmcv.__version__ = "1.7.0"  # the vendored mmdet 2.25.3 asserts mmcv <= 1.7.0; the Python parts used are identical
import mmdet  # noqa: E402,F401

mmcv.__version__ = _version
import pycocotools.mask as mask_utils  # noqa: E402
from mmcv import Config  # noqa: E402
from mmcv.parallel import collate  # noqa: E402
from mmdet.core.mask.structures import BitmapMasks  # noqa: E402
from mmdet.datasets.pipelines import Collect, DefaultFormatBundle, Normalize, Pad  # noqa: E402
from mmdet.models import build_detector  # noqa: E402

import projects.models  # noqa: E402,F401

logging.getLogger("mmcv").setLevel(logging.ERROR)
assert all(CPU_PATCH.values()), f"CPU patch not applied: {CPU_PATCH}"


# ----------------------------------------------------------------- helpers
def det(x):
    """Detached clones, recursively; numpy -> torch; numpy scalars -> python."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x).copy())
    if isinstance(x, list | tuple):
        return [det(v) for v in x]
    if isinstance(x, dict):
        return {k: det(v) for k, v in x.items()}
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def plain(o):
    if isinstance(o, dict):
        return {str(k): plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [plain(v) for v in o]
    if isinstance(o, np.ndarray):
        return [float(v) for v in o.reshape(-1).tolist()] if o.dtype.kind == "f" else o.tolist()
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return o


def pack_masks(masks, shape):
    """Binary masks ``(N, H, W)`` as ``{"bits": packed uint8 (np.packbits, C order), "shape": [N, H, W]}``."""
    stacked = np.stack([m.numpy() if torch.is_tensor(m) else m for m in masks]).astype(bool) if masks else \
        np.zeros((0, *shape), dtype=bool)
    return dict(bits=torch.from_numpy(np.packbits(stacked.reshape(-1))), shape=list(stacked.shape))


def in_detection_order(scores_by_class, labels):
    """The reference returns mask scores grouped by class (detection order within a class); back to one score per
    detection in detection order."""
    taken = [0] * len(scores_by_class)
    out = []
    for label in labels.tolist():
        out.append(float(scores_by_class[label][taken[label]]))
        taken[label] += 1
    return torch.tensor(out, dtype=torch.float32)


def meta_clean(meta):
    """An image meta with numpy values made plain (lists / floats), so that the records load with
    ``torch.load(weights_only=True)``."""
    return {k: plain(v) for k, v in meta.items()}


# ----------------------------------------------------------------- the tiny config
def tiny_cfg() -> Config:
    cfg = Config.fromfile(CONFIG)
    m = cfg.model
    K, E = S["num_classes"], S["embed"]
    vit = m.backbone
    vit.img_size = S["vit_pretrain_img"]
    vit.pretrain_img_size = S["vit_pretrain_img"]
    vit.embed_dim, vit.depth, vit.num_heads = S["vit_embed"], S["vit_depth"], S["vit_heads"]
    vit.window_size, vit.window_block_indexes = S["vit_window"], S["vit_window_blocks"]
    vit.drop_path_rate, vit.use_act_checkpoint = 0.0, False
    m.neck.in_channels, m.neck.out_channels = [S["vit_embed"]], E
    for head in (m.rpn_head,):
        head.in_channels, head.feat_channels = E, E
    sizes = S["mask_stage_sizes"]
    m.mask_roi_extractor.out_channels = E
    m.mask_roi_extractor.roi_layer.output_size = sizes[0]
    mh = m.mask_head
    mh.num_convs_semantic = S["mask_semantic_convs"]
    mh.conv_in_channels_instance = mh.conv_in_channels_semantic = E
    mh.conv_out_channels_instance = mh.conv_out_channels_semantic = S["mask_channels"]
    mh.stage_sup_size = sizes
    mh.stage_num_classes = [K] * (len(sizes) - 1) + [1]
    mi = m.mask_iou_head
    mi.roi_feat_size, mi.in_channels, mi.conv_out_channels = sizes[0], E, S["mask_channels"]
    mi.fc_out_channels, mi.num_classes = S["mask_iou_fc"], K
    qh = m.query_head
    qh.num_query, qh.num_classes, qh.in_channels = S["queries"], K, S["vit_embed"]
    qh.dn_cfg.group_cfg.num_dn_queries = S["dn_queries"]
    tr = qh.transformer
    tr.encoder.num_layers, tr.encoder.with_cp = S["enc_layers"], 0
    tr.decoder.num_layers = S["dec_layers"]
    enc_layer, dec_layer = tr.encoder.transformerlayers, tr.decoder.transformerlayers
    enc_layer.attn_cfgs.update(embed_dims=E, num_heads=S["heads"], num_points=S["points"])
    dec_layer.attn_cfgs[0].update(embed_dims=E, num_heads=S["heads"])
    dec_layer.attn_cfgs[1].update(embed_dims=E, num_heads=S["heads"], num_points=S["points"])
    for layer in (enc_layer, dec_layer):
        layer.feedforward_channels = S["ffn"]
        # mmcv's default ffn_cfgs carry embed_dims=256; with another width it must be given (same values otherwise)
        layer.ffn_cfgs = dict(type="FFN", embed_dims=E, feedforward_channels=S["ffn"], num_fcs=2, ffn_drop=0.0,
                              act_cfg=dict(type="ReLU", inplace=True))
    qh.positional_encoding.num_feats = E // 2
    roi = m.roi_head[0]
    roi.bbox_roi_extractor.out_channels = E
    bh = roi.bbox_head
    bh.in_channels, bh.conv_out_channels, bh.fc_out_channels, bh.num_classes = E, E, S["roi_fc"], K
    atss = m.bbox_head[0]
    atss.num_classes, atss.in_channels, atss.feat_channels = K, E, E
    # train / test settings that a tiny model needs smaller
    train, test = m.train_cfg, m.test_cfg
    train[1].sampler.num = S["mask_sampler_num"]
    train[1].sampler.pos_fraction = S["mask_sampler_pos_fraction"]
    train[2].rpn_proposal.nms_pre, train[2].rpn_proposal.max_per_img = S["rpn_nms_pre"], S["rpn_max_per_img"]
    train[2].rcnn.sampler.num = S["roi_sampler_num"]
    test[0].max_per_img = S["test_max_per_img"]
    test[0].nms.iou_threshold = S["soft_nms_iou"]
    test[2].rpn.nms_pre, test[2].rpn.max_per_img = S["rpn_nms_pre"], S["rpn_max_per_img"]
    return cfg


cfg = tiny_cfg()
torch.manual_seed(S["seed_init"])
model = build_detector(cfg.model)
model.init_weights()  # as mmdet 2.x tools/train.py after build_detector (mask head init included)

perturbed = []
g = torch.Generator().manual_seed(S["seed_perturb"])
with torch.no_grad():
    for key, value in model.state_dict(keep_vars=True).items():
        if not value.is_floating_point() or value.numel() == 0 or "rope" in key:
            continue
        flat = value.reshape(-1)
        if bool((flat == flat[0]).all()):
            before = float(flat[0])
            if key.endswith("running_var"):
                value.mul_(torch.exp(torch.randn(value.shape, generator=g) * 0.1))
                how = "mul exp(N(0,0.1^2))"
            else:
                value.add_(torch.randn(value.shape, generator=g) * 0.1)
                how = "add N(0,0.1^2)"
            perturbed.append([key, list(value.shape), before, how])
model.eval()
state_dict = {k: v.detach().clone() for k, v in model.state_dict().items() if "rope" not in k}
torch.save(state_dict, os.path.join(OUT, "tiny_state_dict.pth"))

# ----------------------------------------------------------------- inputs: 3 images, polygon masks, one RLE image
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]
SPECS = [
    dict(hw=(128, 160), ori=(160, 200), s=0.8,
         polygons=[[[12, 20, 70, 14, 84, 60, 40, 90, 10, 70]], [[96, 30, 150, 40, 140, 110, 100, 100]],
                   [[30, 96, 64, 100, 60, 124, 24, 120]]],
         labels=[0, 3, 1]),
    dict(hw=(96, 128), ori=(96, 128), s=1.0,
         ellipses=[(40, 40, 28, 22), (94, 60, 22, 26)], labels=[2, 4]),
    dict(hw=(112, 96), ori=(224, 192), s=0.5,
         polygons=[[[8, 10, 60, 6, 70, 50, 20, 64]], [[30, 60, 88, 70, 80, 108, 36, 104], [10, 90, 22, 90, 16, 104]]],
         labels=[1, 0]),
]
for i, spec in enumerate(SPECS):  # the RLE image's shapes are ellipses; others polygons
    if i == S["rle_image"] and "polygons" in spec:
        raise SystemExit("rle_image must name the image defined by ellipses")


def segmentation_of(spec, index, h, w):
    """(COCO segmentation, bitmap) per instance: polygons as COCO polygon lists, ellipses as compressed RLE."""
    out = []
    if "polygons" in spec:
        for poly in spec["polygons"]:
            rles = mask_utils.frPyObjects([list(map(float, p)) for p in poly], h, w)
            out.append((poly, mask_utils.decode(mask_utils.merge(rles))))
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        for cx, cy, rx, ry in spec["ellipses"]:
            bitmap = (((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1).astype(np.uint8)
            rle = mask_utils.encode(np.asfortranarray(bitmap))
            rle["counts"] = rle["counts"].decode("ascii")
            out.append((rle, mask_utils.decode(dict(size=rle["size"], counts=rle["counts"].encode("ascii")))))
    return out


def synth_image(spec, bitmaps, gen):
    h, w = spec["hw"]
    yy = torch.linspace(0, 1, h)[:, None].expand(h, w)
    xx = torch.linspace(0, 1, w)[None, :].expand(h, w)
    img = torch.stack([60 + 100 * xx, 60 + 100 * yy, 60 + 50 * (xx + yy)], 0)
    img = img + torch.randint(-40, 41, (3, h, w), generator=gen).float()
    for bitmap in bitmaps:
        colour = torch.randint(0, 256, (3,), generator=gen).float()
        region = torch.from_numpy(bitmap).bool()
        img[:, region] = 0.4 * img[:, region] + 0.6 * colour[:, None]
    return img.round().clamp(0, 255).to(torch.uint8)


gen = torch.Generator().manual_seed(S["seed_images"])
samples, raw_images, segmentations = [], [], []
pipe = [Normalize(mean=MEAN, std=STD, to_rgb=True), Pad(size_divisor=32), DefaultFormatBundle(),
        Collect(keys=["img", "gt_bboxes", "gt_labels", "gt_masks"])]
for i, spec in enumerate(SPECS):
    h, w = spec["hw"]
    segs = segmentation_of(spec, i, h, w)
    bitmaps = [b for _, b in segs]
    boxes = []
    for bitmap in bitmaps:  # COCO boxes: the tight bounds of each mask (x2 / y2 exclusive)
        ys, xs = np.nonzero(bitmap)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
    image = synth_image(spec, bitmaps, gen)
    raw_images.append(image)
    segmentations.append([s for s, _ in segs])
    record = dict(img=image.permute(1, 2, 0).numpy().copy(), img_fields=["img"], filename=f"synthetic_{i}.png",
                  ori_filename=f"synthetic_{i}.png", ori_shape=(spec["ori"][0], spec["ori"][1], 3),
                  img_shape=(h, w, 3), scale_factor=np.array([spec["s"]] * 4, dtype=np.float32), keep_ratio=True,
                  flip=False, flip_direction=None, gt_bboxes=np.array(boxes, dtype=np.float32),
                  gt_labels=np.array([lab % S["num_classes"] for lab in spec["labels"]], dtype=np.int64),
                  bbox_fields=["gt_bboxes"],
                  gt_masks=BitmapMasks(np.stack(bitmaps), h, w), mask_fields=["gt_masks"])
    for step in pipe:
        record = step(record)
    samples.append(record)
batch = collate(samples, samples_per_gpu=len(samples))
IMG = batch["img"].data[0].contiguous()
METAS = batch["img_metas"].data[0]
GT_BOXES = batch["gt_bboxes"].data[0]
GT_LABELS = batch["gt_labels"].data[0]
GT_MASKS = batch["gt_masks"].data[0]  # BitmapMasks at each image's own pad_shape

torch.save(dict(
    raw_images_bgr_uint8=[im.clone() for im in raw_images],
    img=IMG.clone(), img_metas=[meta_clean(m) for m in METAS],
    gt_bboxes=[b.clone() for b in GT_BOXES], gt_labels=[lab.clone() for lab in GT_LABELS],
    gt_masks=[torch.from_numpy(m.masks.copy()) for m in GT_MASKS],
    mean=MEAN, std=STD, to_rgb=True, pad_size_divisor=32,
), os.path.join(OUT, "tiny_inputs.pth"))
json.dump(dict(segmentations=segmentations, image_sizes=[s["hw"] for s in SPECS],
               rle_image=S["rle_image"]), open(os.path.join(OUT, "tiny_segmentations.json"), "w"), indent=0)


# ----------------------------------------------------------------- recording
class Rec:
    train = None


R = Rec()


def wrap(owner, name, record):
    original = getattr(owner, name)

    def wrapper(*a, **k):
        out = original(*a, **k)
        if R.train is not None:
            record(R.train, a, k, out)
        return out

    setattr(owner, name, wrapper)


def sampling(res):
    return dict(pos_inds=det(res.pos_inds), neg_inds=det(res.neg_inds), pos_assigned_gt_inds=det(res.pos_assigned_gt_inds),
                pos_gt_labels=det(getattr(res, "pos_gt_labels", None)), pos_bboxes=det(res.pos_bboxes),
                pos_is_gt=det(res.pos_is_gt))


qh = model.query_head
wrap(model.bbox_sampler, "sample", lambda r, a, k, o: r.setdefault("mask_sampling", []).append(sampling(o)))
wrap(model.rpn_head.sampler, "sample", lambda r, a, k, o: r.setdefault("rpn_sampling", []).append(sampling(o)))
wrap(model.roi_head[0].bbox_sampler, "sample",
     lambda r, a, k, o: r.setdefault("roi_sampling", []).append(sampling(o)))
wrap(model.rpn_head, "forward_train", lambda r, a, k, o: r.__setitem__(
    "rpn_proposals", [dict(bboxes=det(p[:, :4]), scores=det(p[:, 4])) for p in o[1]]))
wrap(qh, "forward_train", lambda r, a, k, o: r.update(
    query_head_detections=det(list(o[2]))))
wrap(model.mask_head, "get_targets", lambda r, a, k, o: r.__setitem__(
    "mask_targets", [pack_masks(list(t.bool()), t.shape[-2:]) for t in o]))
wrap(model.mask_head, "forward", lambda r, a, k, o: r.update(
    mask_rois=det(a[2]), mask_roi_labels=det(a[3]), stage_instance_preds=det(list(o[0]))))
wrap(model.mask_iou_head, "get_targets", lambda r, a, k, o: r.__setitem__("mask_iou_targets", det(o)))
wrap(model.mask_iou_head, "forward", lambda r, a, k, o: r.__setitem__("mask_iou_pred", det(o)))


def aux_targets(r, a, k, o):
    names = ["aux_coords", "aux_labels", "aux_targets", "aux_label_weights", "aux_bbox_weights", "aux_feats", "attn_masks"]
    r.setdefault("aux_targets", []).append({n: det(v) for n, v in zip(names, o)})


wrap(qh, "get_aux_targets", aux_targets)


# ----------------------------------------------------------------- eval
def prepare(metas):
    metas = copy.deepcopy(metas)
    for meta in metas:
        meta["batch_input_shape"] = tuple(IMG.shape[-2:])
    return metas


def run_eval():
    model.eval()
    metas = prepare(METAS)
    captured = {}
    original_forward = model._mask_forward

    def mask_forward(x, rois, labels):
        out = original_forward(x, rois, labels)
        captured.setdefault("chunks", []).append(dict(
            rois=det(rois), labels=det(labels), stage_instance_preds=det(out["stage_instance_preds"])))
        return out

    model._mask_forward = mask_forward
    original_iou = model.mask_iou_head.forward

    def iou_forward(*a, **k):
        out = original_iou(*a, **k)
        captured.setdefault("mask_iou_pred", []).append(det(out))
        return out

    model.mask_iou_head.forward = iou_forward
    original_paste = model.mask_head.get_seg_masks

    def get_seg_masks(mask_pred, *a, **k):
        captured.setdefault("refined_logits", []).append(det(mask_pred))
        out = original_paste(mask_pred, *a, **k)
        captured.setdefault("pasted", []).append([torch.from_numpy(m) for m in out])
        return out

    model.mask_head.get_seg_masks = get_seg_masks
    per_image = []
    with torch.no_grad():
        x = model.extract_feat(IMG, metas)
        outs = qh.forward(x, metas)
        results, enc_outs = qh.simple_test(x, metas, rescale=True, return_encoder_output=True)
        for i, (bboxes, labels) in enumerate(results):
            captured.clear()
            # simple_test_mask, called once per image: its batch loop overwrites det_bboxes after the first image
            # and CoDETR.simple_test_query_head stacks per-image detections, which soft-NMS leaves of unequal length
            segm, scores = model.simple_test_mask([lvl[i:i + 1] for lvl in enc_outs], [metas[i]], bboxes[None],
                                                  labels[None], rescale=True)[0]
            per_image.append(dict(
                bboxes=det(bboxes[:, :4]), scores=det(bboxes[:, 4]), labels=det(labels),
                mask_rois=torch.cat([c["rois"] for c in captured.get("chunks", [])]) if captured.get("chunks") else None,
                stage_instance_preds=[torch.cat([c["stage_instance_preds"][s] for c in captured["chunks"]])
                                      for s in range(len(captured["chunks"][0]["stage_instance_preds"]))]
                if captured.get("chunks") else [],
                refined_logits=torch.cat(captured["refined_logits"]) if captured.get("refined_logits") else None,
                mask_iou_pred=torch.cat(captured["mask_iou_pred"]) if captured.get("mask_iou_pred") else None,
                masks=pack_masks([m for chunk in captured.get("pasted", []) for m in chunk], metas[i]["ori_shape"][:2]),
                mask_scores=in_detection_order(scores, labels),
            ))
    model._mask_forward = original_forward
    model.mask_iou_head.forward = original_iou
    model.mask_head.get_seg_masks = original_paste
    # the paste on its own, with logits large enough to fill the boxes (the tiny random model's masks are mostly
    # below the threshold): the reference's get_seg_masks for image 0's detections
    gen_paste = torch.Generator().manual_seed(S["seed_images"] + 1)
    bboxes0, labels0 = results[0]
    size = cfg.model.mask_head.stage_sup_size[-1]
    logits = torch.randn(len(bboxes0), 1, size, size, generator=gen_paste) * 3 + 1
    scale = metas[0]["scale_factor"]
    input_boxes = bboxes0[:, :4] * torch.from_numpy(scale)
    pasted = model.mask_head.get_seg_masks(logits, input_boxes, labels0, model.rcnn_test_cfg, metas[0]["ori_shape"],
                                           scale, True)
    paste_check = dict(logits=logits, input_boxes=input_boxes, scale_factor=torch.from_numpy(scale.copy()),
                       masks=pack_masks(pasted, metas[0]["ori_shape"][:2]))
    return dict(per_image=per_image, enc_outs=det(list(enc_outs)), all_cls_scores=det(outs[0]),
                all_bbox_preds=det(outs[1]), img_metas_used=[meta_clean(m) for m in metas], paste_check=paste_check)


EVAL = run_eval()


# ----------------------------------------------------------------- train
def run_train(seed, deterministic, gt_boxes, gt_labels, gt_masks, backward=True):
    model.train()
    metas = copy.deepcopy(METAS)
    R.train = {}
    calls = []
    original = torch.randperm
    if deterministic:
        def arange(n, *a, **k):
            calls.append(int(n))
            return torch.arange(n, device=k.get("device"))
        torch.randperm = arange
    try:
        torch.manual_seed(seed)
        rng_state = torch.get_rng_state()
        losses = model(img=IMG, img_metas=metas, return_loss=True, gt_bboxes=[b.clone() for b in gt_boxes],
                       gt_labels=[lab.clone() for lab in gt_labels], gt_masks=gt_masks)
    finally:
        torch.randperm = original
    records, R.train = R.train, None
    total, log_vars = model._parse_losses(losses)
    out = dict(losses=det(losses), log_vars={k: float(v) for k, v in log_vars.items()}, total_loss=float(total),
               records=records, cpu_rng_state_before_loss=rng_state, seed=seed,
               gt_bboxes_used=[b.clone() for b in gt_boxes], gt_labels_used=[lab.clone() for lab in gt_labels],
               gt_masks_used=[torch.from_numpy(m.masks.copy()) for m in gt_masks])
    if deterministic:
        out["records"]["randperm_calls"] = calls
    if backward:
        model.zero_grad(set_to_none=True)
        total.backward()
        names, values = [], []
        for name, p in model.named_parameters():
            if p.grad is not None:
                names.append(name)
                grad = p.grad.detach().double()
                values.append([float(grad.norm()), float(grad.sum())])
        out["grad_norm_sum"] = dict(names=names, values=torch.tensor(values, dtype=torch.float64))
        out["params_without_grad"] = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        model.zero_grad(set_to_none=True)
    model.eval()
    return out


train_seeded = run_train(S["seed_train"], False, GT_BOXES, GT_LABELS, GT_MASKS)
again = run_train(S["seed_train"], False, GT_BOXES, GT_LABELS, GT_MASKS, backward=False)
train_seeded["rerun_same_seed_identical"] = again["log_vars"] == train_seeded["log_vars"]
train_det = run_train(S["seed_train"], True, GT_BOXES, GT_LABELS, GT_MASKS)
other = run_train(S["seed_train_other"], True, GT_BOXES, GT_LABELS, GT_MASKS, backward=False)
# deterministic apart from the denoising noise: the seeds change only the dn queries' boxes / labels
train_det["different_seed_log_vars"] = other["log_vars"]
e = S["empty_image"]
empty_boxes = [b if i != e else b[:0] for i, b in enumerate(GT_BOXES)]
empty_labels = [lab if i != e else lab[:0] for i, lab in enumerate(GT_LABELS)]
empty_masks = [m if i != e else BitmapMasks(np.zeros((0, m.height, m.width), np.uint8), m.height, m.width)
               for i, m in enumerate(GT_MASKS)]
train_det_empty_gt = run_train(S["seed_train"], True, empty_boxes, empty_labels, empty_masks)
train_det_empty_gt["empty_gt_img"] = e

meta = dict(
    versions=dict(torch=str(torch.__version__), mmcv=str(mmcv.__version__), mmdet_vendored="2.25.3 (Sense-X/Co-DETR)",
                  numpy=np.__version__, python=sys.version.split()[0],
                  codetr_commit="26653521e47157fdd819e764b4bb949057ea9f3b"),
    settings=S, num_threads=torch.get_num_threads(), cpu_patch=CPU_PATCH,
)
torch.save(dict(eval=EVAL, train_seeded=train_seeded, train_det=train_det, train_det_empty_gt=train_det_empty_gt,
                meta=meta), os.path.join(OUT, "tiny_outputs.pth"))

cfg.dump(os.path.join(OUT, "tiny_config.py"))
json.dump(dict(
    model_cfg=plain(cfg.model.to_dict()), settings=S, seeds={k: v for k, v in S.items() if k.startswith("seed")},
    empty_image=S["empty_image"], rle_image=S["rle_image"],
    num_params=sum(p.numel() for p in model.parameters()),
    perturbation=dict(rule="every floating state-dict tensor whose elements are all equal: += N(0, 0.1^2) (generator "
                           "seed seed_perturb, state_dict order); running_var *= exp(N(0, 0.1^2))",
                      tensors=perturbed, count=len(perturbed)),
    init_procedure=["torch.manual_seed(seed_init)", "build_detector(cfg.model)", "model.init_weights()",
                    "perturbation"],
    derived_from="projects/configs/co_dino_vit/co_dino_5scale_vit_large_coco_instance.py (Sense-X/Co-DETR @ "
                 "26653521e47157fdd819e764b4bb949057ea9f3b)",
), open(os.path.join(OUT, "tiny_config.json"), "w"), indent=1)

summary = {name: dict(log_vars=run["log_vars"], total_loss=run["total_loss"])
           for name, run in (("train_seeded", train_seeded), ("train_det", train_det),
                             ("train_det_empty_gt", train_det_empty_gt))}
summary["train_seeded"]["rerun_same_seed_identical"] = train_seeded["rerun_same_seed_identical"]
summary["eval"] = dict(detections=[len(p["scores"]) for p in EVAL["per_image"]],
                       mask_pixels=[int(np.unpackbits(p["masks"]["bits"].numpy()).sum()) for p in EVAL["per_image"]])
json.dump(summary, open(os.path.join(OUT, "tiny_losses_summary.json"), "w"), indent=1)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


files = ["tiny_config.json", "tiny_state_dict.pth", "tiny_inputs.pth", "tiny_outputs.pth", "tiny_segmentations.json",
         "tiny_losses_summary.json"]
json.dump({f: sha(os.path.join(OUT, f)) for f in files}, open(os.path.join(OUT, "sha256.json"), "w"), indent=1)
if args.full_keys:
    LVIS = os.path.join(CODETR, "projects/configs/co_dino_vit/co_dino_5scale_lsj_vit_large_lvis_instance.py")
    for name, path in (("coco", CONFIG), ("lvis", LVIS)):
        full = Config.fromfile(path)
        full.model.backbone.use_act_checkpoint = False
        torch.manual_seed(0)
        big = build_detector(full.model)
        state = big.state_dict()
        json.dump(dict(config=os.path.relpath(path, CODETR),
                       state_dict=[[k, list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in state.items()],
                       num_entries=len(state), num_params=sum(p.numel() for p in big.parameters())),
                  open(os.path.join(OUT, f"vit_l_{name}_instance_keys.json"), "w"), indent=0)
        del big, state
print("DONE", json.dumps(summary["train_det"]["log_vars"]))
