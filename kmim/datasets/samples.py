"""One stored sample checked against the dataset contract (:func:`check_sample`): its image member, its ``.json``
(key, view geometry) and its ``.tokens.npy`` grid against the manifest's :class:`TokenSpec`. Shared by verify, the
loader and the report."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from kmim.datasets.geometry import center_geometry, geometry_problem
from kmim.datasets.preprocess import IMAGE_EXTS, Preprocess, SkipImage, Source, decode_source
from kmim.datasets.shards import ShardError, decode_npy


def token_problem(tokens: np.ndarray, dtype: str, shape: list[int], k: int) -> str | None:
    """Why a stored token grid breaks the manifest (dtype, shape, ids in [0, k)), or None when it holds."""
    if tokens.dtype != np.dtype(dtype) or list(tokens.shape) != list(shape):
        return f"tokens {tokens.dtype}{list(tokens.shape)}, manifest says {dtype}{list(shape)}"
    if tokens.size and (int(tokens.max()) >= k or int(tokens.min()) < 0):
        bad = int(tokens.max()) if int(tokens.max()) >= k else int(tokens.min())
        return f"token {bad} out of range for K={k}"
    return None


@dataclass(frozen=True)
class TokenSpec:
    """What every stored token grid of a dataset is: numpy ``dtype`` name, ``shape`` [h, w] (one view) or
    [V, h, w] (V views), ids in [0, ``k``)."""

    dtype: str
    shape: tuple[int, ...]
    k: int

    @property
    def views(self) -> int:
        """V, the views stored per sample."""
        return self.shape[0] if len(self.shape) == 3 else 1

    @classmethod
    def of(cls, manifest: dict) -> TokenSpec:
        """The spec a manifest that passed :func:`kmim.datasets.manifest.check_manifest` declares."""
        grid = manifest["token_grid"]
        return cls(grid["dtype"], tuple(grid["shape"]), manifest["codebook"]["k"])


@dataclass(frozen=True)
class CheckedSample:
    """The parts of a stored sample that passed :func:`check_sample`."""

    key: str
    image_ext: str  # one of IMAGE_EXTS
    image: bytes  # the encoded image, as stored
    meta: dict  # the parsed .json member (key, source, label, view)
    tokens: np.ndarray  # the token grids, TokenSpec.dtype [h, w] or [V, h, w]
    geometry: list[dict]  # each view's geometry, view 0 first


def check_sample(sample: dict, spec: TokenSpec, where: str) -> CheckedSample:
    """Check one stored sample ``{"__key__": key, ext: bytes}`` against the contract; return its parts.

    A sample holds exactly one image member with an extension of ``IMAGE_EXTS``, a ``.json`` object whose
    ``key`` is the sample's key and whose ``view`` is the view's geometry (a list of V, view 0 a center view,
    when ``spec`` has V > 1 views), and a ``.tokens.npy`` grid of ``spec``'s dtype and shape with ids in [0, K);
    other members are ignored, never decoded. Raises :class:`ShardError` ``"<where>: <reason>"`` at the first
    problem.
    """
    images = [e for e in IMAGE_EXTS if e in sample]
    if len(images) != 1:
        raise ShardError(f"{where}: expected one image member, found {images or 'none'}")
    try:
        meta = json.loads(sample["json"])
    except (KeyError, ValueError) as e:
        raise ShardError(f"{where}: no valid .json member ({e})") from None
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: the .json member is not a JSON object")
    if meta.get("key") != sample["__key__"]:
        raise ShardError(f"{where}: .json key {meta.get('key')!r} does not match the member name")
    geometry = _sample_geometry(meta.get("view"), spec.views, where)
    tokens = _sample_tokens(sample, spec, where)
    return CheckedSample(sample["__key__"], images[0], sample[images[0]], meta, tokens, geometry)


def _sample_geometry(view: object, views: int, where: str) -> list[dict]:
    """The ``views`` geometries of a sample's ``.json`` ``view`` field, each checked; :class:`ShardError`
    otherwise."""
    geometry = [view] if views == 1 else view
    if not (isinstance(geometry, list) and len(geometry) == views):
        raise ShardError(f"{where}: .json view is not a list of {views} view geometries")
    for v, g in enumerate(geometry):
        problem = geometry_problem(g)
        if problem is None and (v == 0) != ("source_box" not in g):
            problem = "view 0 must be the center view, the others random crops"
        if problem is not None:
            raise ShardError(f"{where}: view {v}: {problem}")
    return geometry


def _sample_tokens(sample: dict, spec: TokenSpec, where: str) -> np.ndarray:
    """The sample's ``.tokens.npy`` grid, checked against ``spec``; :class:`ShardError` otherwise."""
    if "tokens.npy" not in sample:
        raise ShardError(f"{where}: no .tokens.npy")
    try:
        tokens = decode_npy(sample["tokens.npy"], (spec.dtype, spec.shape))
    except Exception as e:  # noqa: BLE001 - bytes np.load refuses, whatever the reason, break the contract
        raise ShardError(f"{where}: .tokens.npy is not a .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(tokens, np.ndarray):  # an .npz archive
        raise ShardError(f"{where}: .tokens.npy is not a .npy array")
    if (problem := token_problem(tokens, spec.dtype, list(spec.shape), spec.k)) is not None:
        raise ShardError(f"{where}: {problem}")
    return tokens


def decode_sample(sample: dict, spec: TokenSpec, pre: Preprocess, where: str) -> tuple[CheckedSample, Source]:
    """:func:`check_sample`, then its stored image decoded as the tokenizer decoded it (:func:`decode_source`);
    raises :class:`ShardError` ``"<where>: <reason>"`` (an image that does not decode breaks the contract too). The
    path every reader of stored samples shares: the training loader and the report."""
    checked = check_sample(sample, spec, where)
    try:
        return checked, decode_source(checked.image, pre)
    except SkipImage as e:
        raise ShardError(f"{where}: stored image does not decode ({e})") from None


def view_problem(geometry: dict, view: int, source: Source, size: int) -> str | None:
    """Why stored view ``view``'s ``geometry`` is not a view of the decoded ``source`` at ``size`` px (its source
    size differs, or view 0 is not the center view), or None."""
    width, height = source.image.size
    if geometry["source_size"] != [width, height] or (view == 0 and geometry != center_geometry(width, height, size)):
        return f"view {view} {geometry} is not a view of the stored {width}x{height} image at {size}px"
    return None
