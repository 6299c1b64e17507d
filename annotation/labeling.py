"""The labeling config and the Label Studio brush codec for conflict masks (ARCHITECTURE: contracts).

A task shows the target (ground truth) and the reference side by side; the annotator paints on the
REFERENCE: `conflict` where the reference's local state differs from the target's (mouth open/closed,
eyes, glasses, beard, make-up, wrinkles), `ignore` over background and hair. Unpainted reference pixels
are consistent face (0). A reviewer may tick `review: accept` on the annotation that should win.

Decoding follows the mask contract: 0 consistent, 1 conflict, 255 ignore; conflict is painted over
ignore (a conflicting accessory may leave the face outline). Every malformed result is an
`AnnotationError` naming the task and what is wrong.
"""

from __future__ import annotations

import hashlib

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from models.refsel import MASK_CONFLICT, MASK_CONSISTENT, MASK_IGNORE

BRUSH = "mask"  # from_name of the BrushLabels
REVIEW = "review"  # from_name of the review Choices
LABELS = ("conflict", "ignore")

LABEL_CONFIG = f"""<View>
  <Header value="Paint on the REFERENCE (right) where it must NOT be copied into the target (left)."/>
  <Text name="instructions" value="$instructions"/>
  <View style="display: flex; gap: 16px;">
    <View style="flex: 50%">
      <Header value="Target (ground truth)" size="6"/>
      <Image name="gt" value="$gt" zoom="true" zoomControl="true"/>
    </View>
    <View style="flex: 50%">
      <Header value="Reference: paint here" size="6"/>
      <Image name="ref" value="$ref" zoom="true" zoomControl="true" brightnessControl="true"/>
    </View>
  </View>
  <BrushLabels name="{BRUSH}" toName="ref">
    <Label value="conflict" background="#ff0000"
           hint="The reference's local state differs from the target: mouth open/closed, eyes, glasses, beard, make-up, wrinkles"/>
    <Label value="ignore" background="#3050ff" hint="Background, hair, neck: neither consistent nor conflicting"/>
  </BrushLabels>
  <Choices name="{REVIEW}" toName="ref" choice="single" showInline="true">
    <Choice value="accept" hint="Reviewer: this annotation is the final mask for the pair"/>
    <Choice value="reject" hint="Reviewer: this annotation must not be used"/>
  </Choices>
</View>"""

INSTRUCTIONS = (
    "Compare the two faces. On the reference, paint CONFLICT over every region whose state differs from "
    "the target (open vs closed mouth, open vs closed eyes, glasses present in only one, beard in only one, "
    "make-up, wrinkles of another age). Paint IGNORE over background and hair. Leave the rest unpainted: it "
    "is consistent face and may be copied. Correct the pre-annotation rather than starting over."
)


class AnnotationError(ValueError):
    """A malformed annotation or prediction; the message names the task."""


def _region_id(task_key: str, label: str, salt: str) -> str:
    return hashlib.sha1(f"{task_key}|{label}|{salt}".encode()).hexdigest()[:10]


def mask_to_result(mask: np.ndarray, task_key: str, salt: str = "") -> list[dict]:
    """Contract mask (H, W) uint8 → Label Studio result: one brush region per non-empty label."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise AnnotationError(f"task {task_key}: a mask must be (H, W) uint8, got {mask.shape} {mask.dtype}")
    bad = np.setdiff1d(np.unique(mask), [MASK_CONSISTENT, MASK_CONFLICT, MASK_IGNORE])
    if bad.size:
        raise AnnotationError(f"task {task_key}: mask values {bad.tolist()} are outside the contract 0/1/255")
    h, w = mask.shape
    out = []
    for label, value in (("conflict", MASK_CONFLICT), ("ignore", MASK_IGNORE)):
        region = mask == value
        if not region.any():
            continue
        out.append(
            {
                "id": _region_id(task_key, label, salt),
                "from_name": BRUSH,
                "to_name": "ref",
                "type": "brushlabels",
                "original_width": w,
                "original_height": h,
                "image_rotation": 0,
                "value": {
                    "format": "rle",
                    "rle": [int(v) for v in mask2rle(region.astype(np.uint8) * 255)],
                    "brushlabels": [label],
                },
            }
        )
    return out


def review_choice(result: list[dict]) -> str | None:
    """'accept', 'reject' or None from an annotation's review Choices."""
    for r in result:
        if r.get("from_name") == REVIEW and r.get("type") == "choices":
            choices = r.get("value", {}).get("choices", [])
            return choices[0] if choices else None
    return None


def result_to_mask(result: list[dict], height: int, width: int, task_key: str) -> np.ndarray:
    """Decode an annotation's brush regions to a contract mask (H, W) uint8; strict about every field."""
    mask = np.full((height, width), MASK_CONSISTENT, np.uint8)
    painted = {"conflict": np.zeros((height, width), bool), "ignore": np.zeros((height, width), bool)}
    for r in result:
        if r.get("from_name") == REVIEW:
            continue
        if r.get("type") != "brushlabels" or r.get("from_name") != BRUSH:
            raise AnnotationError(
                f"task {task_key}: unexpected region type {r.get('type')!r} from {r.get('from_name')!r}; "
                f"the config has brushlabels {BRUSH!r} and choices {REVIEW!r}"
            )
        v = r.get("value", {})
        labels = v.get("brushlabels") or []
        unknown = [lb for lb in labels if lb not in LABELS]
        if unknown or not labels:
            raise AnnotationError(
                f"task {task_key}: region {r.get('id')} has label(s) {labels or '(none)'}; valid: {', '.join(LABELS)}"
            )
        ow, oh = r.get("original_width"), r.get("original_height")
        if (ow, oh) != (width, height):
            raise AnnotationError(
                f"task {task_key}: region {r.get('id')} was painted on a {ow}x{oh} image but the reference is {width}x{height}"
            )
        if v.get("format") != "rle" or not v.get("rle"):
            raise AnnotationError(f"task {task_key}: region {r.get('id')} has an empty brush")
        try:
            flat = decode_rle(v["rle"])
        except Exception as exc:  # the SDK decoder raises bare IndexError/ValueError on garbage
            raise AnnotationError(f"task {task_key}: region {r.get('id')} has a corrupt RLE ({exc})") from exc
        if flat.size != height * width * 4:
            raise AnnotationError(
                f"task {task_key}: region {r.get('id')} brush covers {flat.size // 4} pixels, out of bounds "
                f"of the {width}x{height} reference"
            )
        alpha = flat.reshape(height, width, 4)[..., 3] > 127
        if not alpha.any():
            raise AnnotationError(f"task {task_key}: region {r.get('id')} has an empty brush")
        for lb in labels:
            painted[lb] |= alpha
    mask[painted["ignore"]] = MASK_IGNORE
    mask[painted["conflict"]] = MASK_CONFLICT
    return mask
