"""GPU check: token equality GPU vs CPU, then tokenization, k-means and trainer throughput; one JSON file.

    .venv/bin/python benchmarks/gpu_check.py [--tiny] [--out gpu_check.json] [--device auto|cpu|cuda]

(a) Tokens: for the pixel extractor and a randomly initialised ViT-S/16 ``dino`` extractor (weights saved to a
    temporary file and loaded as real ones are; nothing is downloaded), fp32 features and exact tokens on the
    device vs on the CPU. Tokens of the *same* features must be identical, also with TF32 / reduced float32
    matmul precision switched on globally; tokens of the device's own features may differ only on patches whose
    CPU margin is within what the feature difference can move ("unexplained" must be 0). Without a GPU the
    CPU path is compared with itself: torch GEMM vs faiss, and reduced precision ("medium": bfloat16 on CPUs
    with AMX) vs IEEE.
(b) Throughput: DINO-sized tokenization (synthetic ImageNet-sized JPEGs: threaded decode, extract in the
    default dtype, exact assign; images/s and each phase's share), the k-means fit vs faiss.Kmeans (faiss GPU
    when it works, else CPU), k-means++ on 1 vs all CPU threads and on the GPU, and kmim's trainer (K-MIM
    objective, bf16 autocast on CUDA) samples/s and MFU.
(c) Results go to one JSON file, rewritten after every section, so a run cut short keeps what it measured.

``--tiny`` runs small models and data (the CPU test of this script's logic); numbers from it mean nothing.
Exit status 1 when a token check fails or the k-means++ picks depend on the thread count.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from kmim.config import load_config
from kmim.datasets.preprocess import Preprocess, decode_view
from kmim.pipeline.specs import extractor_spec
from kmim.tokenizers import dino, kmeanspp
from kmim.tokenizers.assign import _faiss, nearest
from kmim.tokenizers.extractors import PixelExtractor, build_extractor
from kmim.tokenizers.kmeans import fit_kmeans
from kmim.tokenizers.kmeanspp import kmeans_plus_plus
from kmim.trainer.ddp import setup_distributed
from kmim.trainer.engine import make_optimizer, masking_generator
from kmim.trainer.objectives import build_objective
from kmim.trainer.vit import ViTConfig

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name substring; first match wins. Unknown GPUs: MFU null.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))


@dataclass(frozen=True)
class Settings:
    image_size: int = 224
    patch_size: int = 16
    vit: dict = field(default_factory=dict)  # timm create_model overrides of vit_small_patch16_224 (none: ViT-S/16)
    check_images: int = 64  # images of the token-equality check
    check_k: int = 100
    tokenize_images: int = 2048
    source_size: tuple[int, int] = (500, 375)  # synthetic JPEG width, height (ImageNet-typical)
    batch_size: int = 256
    tokenize_k: int = 100
    kmeans_points: int = 200_000
    kmeans_dim: int = 384
    kmeans_k: int = 1024
    kmeans_epochs: int = 10
    train_model: str = "base"
    train_encoder: tuple[int, int, int] | None = None  # (dim, depth, heads) override
    train_decoder: tuple[int, int, int] | None = None
    train_batch: int = 128
    train_k: int = 100
    train_warmup: int = 3
    train_steps: int = 20


TINY = Settings(image_size=64, patch_size=16, vit={"depth": 2, "embed_dim": 64, "num_heads": 2}, check_images=8,
                check_k=16, tokenize_images=32, source_size=(80, 60), batch_size=16, tokenize_k=16,
                kmeans_points=4000, kmeans_dim=16, kmeans_k=16, kmeans_epochs=2, train_model="tiny",
                train_encoder=(64, 2, 2), train_decoder=(32, 1, 2), train_batch=8, train_k=16, train_warmup=1,
                train_steps=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, size, size]."""
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def machine(device: torch.device) -> dict:
    faiss = _faiss()
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "faiss": faiss.__version__, "faiss_gpus": gpus}


def dino_extractor(weights: Path, s: Settings, device: torch.device, dtype: str):
    """The ``dino`` extractor on random ViT-S/16 (or --tiny) weights from ``weights`` (written on first use)."""
    kwargs = {**s.vit, "img_size": s.image_size}
    if not weights.exists():
        torch.manual_seed(0)
        from safetensors.torch import save_file

        net = dino.build("vit_small_patch16_224", kwargs, None, None, None).module
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    cfg = load_config(None, {"out": "unused", "extractor": "dino", "model": "vit_small_patch16_224",
                             "model_kwargs": json.dumps(kwargs), "weights": str(weights), "device": str(device),
                             "dtype": dtype, "image_size": s.image_size, "patch_size": s.patch_size})
    return build_extractor(extractor_spec(cfg))


# ---- (a) token equality ---------------------------------------------------------------------------------


def unexplained(f_ref: torch.Tensor, f_dev: torch.Tensor, c: torch.Tensor, t_ref: torch.Tensor,
                t_dev: torch.Tensor) -> int:
    """Patches (rows of features [N, D]) whose tokens differ although, with the reference features, the
    reference token is nearer than the other by more than the feature difference delta can change:
    |‖g - c‖² - ‖f - c‖²| <= delta (2 ‖f - c‖ + delta) for each of the two centroids (l2)."""
    rows = torch.nonzero(t_ref != t_dev).flatten()
    f, g = f_ref[rows].double(), f_dev[rows].double()
    ca, cb = c[t_ref[rows]].double(), c[t_dev[rows]].double()
    delta = (f - g).norm(dim=1)
    da, db = (f - ca).norm(dim=1), (f - cb).norm(dim=1)
    margin = db**2 - da**2
    slack = delta * (2 * da + 2 * db + 2 * delta) + 1e-12 * (da + db) ** 2
    return int((margin > slack).sum())


def token_check(name: str, extract_ref, extract_dev, images: torch.Tensor, k: int, device: torch.device) -> dict:
    """Exact tokens of ``images`` uint8 [B, 3, S, S] from the reference (CPU fp32) and the device's features
    (both callables: images -> [B, h, w, D]) against one codebook (k-means on the reference features)."""
    with torch.inference_mode():
        f_ref = extract_ref(images)
        f_ref = f_ref.reshape(-1, f_ref.shape[-1])
        f_dev = extract_dev(images).reshape(f_ref.shape).cpu()
    c = fit_kmeans(f_ref, k, epochs=2, batch_size=4096, seed=0, device="cpu").centroids
    t_ref = nearest(f_ref, c, method="torch")[0]
    t_faiss = nearest(f_ref, c, method="faiss")[0]
    gpu = device.type == "cuda"
    reduced = "high" if gpu else "medium"  # what a trainer process may have set ("high": TF32 on CUDA)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(reduced)
    try:
        t_same = nearest(f_ref.to(device), c.to(device), method="torch")[0].cpu()
    finally:
        torch.set_float32_matmul_precision(before)
    t_dev = nearest(f_dev.to(device), c.to(device))[0].cpu()
    out = {"patches": f_ref.shape[0], "dim": f_ref.shape[1], "k": k,
           "compared": f"{device.type} fp32 features and tokens vs cpu fp32" if gpu else
           "no GPU: cpu vs cpu (features equal by construction; tokens: torch GEMM under reduced precision, faiss)",
           "features_max_abs_diff": float((f_dev - f_ref).abs().max()),
           "same_features_tokens_equal": bool(torch.equal(t_same, t_ref)), "reduced_precision": reduced,
           "faiss_tokens_equal": bool(torch.equal(t_faiss, t_ref)),
           "token_mismatches": int((t_dev != t_ref).sum()),
           "unexplained_mismatches": unexplained(f_ref, f_dev, c, t_ref, t_dev)}
    out["ok"] = out["same_features_tokens_equal"] and out["faiss_tokens_equal"] and out["unexplained_mismatches"] == 0
    print(f"tokens {name}: {out}", file=sys.stderr)
    return out


def check_tokens(s: Settings, device: torch.device, weights: Path) -> dict:
    images = random_images(s.check_images, s.image_size, seed=1)
    pixel = PixelExtractor(s.patch_size)
    return {"pixel": token_check("pixel", pixel, lambda x: pixel(x.to(device)), images, s.check_k, device),
            "dino": token_check("dino", dino_extractor(weights, s, torch.device("cpu"), "fp32"),
                                dino_extractor(weights, s, device, "fp32"), images, s.check_k, device)}


# ---- (b) throughput -------------------------------------------------------------------------------------


def synthetic_jpegs(n: int, size: tuple[int, int], threads: int) -> list[bytes]:
    """n JPEGs (quality 90) of smooth random content at size (width, height)."""
    def one(i: int) -> bytes:
        rng = np.random.default_rng(i)
        small = Image.fromarray(rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def bench_tokenize(s: Settings, device: torch.device, weights: Path) -> dict:
    """images/s of decode -> extract (default dtype: bf16 on CUDA) -> exact assign, and each phase's share."""
    threads = len(os.sched_getaffinity(0))
    data = synthetic_jpegs(s.tokenize_images, s.source_size, threads)
    extractor = dino_extractor(weights, s, device, "auto")
    pre = Preprocess(s.image_size)
    seconds = {"decode": 0.0, "extract": 0.0, "assign": 0.0}
    with ThreadPoolExecutor(threads) as pool, torch.inference_mode():

        def decode(batch: list[bytes]) -> torch.Tensor:  # uint8 [B, 3, S, S]
            return torch.from_numpy(np.stack([v.pixels for v in pool.map(lambda b: decode_view(b, pre), batch)]))\
                .permute(0, 3, 1, 2)

        # Warm-up batch (not timed); its features give the codebook: K random patch features, on the device.
        feats = extractor(decode(data[:s.batch_size]))
        feats = feats.reshape(-1, feats.shape[-1])
        codebook = feats[torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(0))[:s.tokenize_k]]
        codebook = codebook.to(device)
        nearest(feats.to(device), codebook, metric=extractor.metric)
        for start in range(0, len(data), s.batch_size):
            t0 = time.perf_counter()
            images = decode(data[start:start + s.batch_size])
            t1 = time.perf_counter()
            feats = extractor(images)  # float32 [B, h, w, D] on the CPU
            t2 = time.perf_counter()
            nearest(feats.reshape(-1, feats.shape[-1]).to(device), codebook, metric=extractor.metric)[0].cpu()
            t3 = time.perf_counter()
            for phase, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                seconds[phase] += dt
    total = sum(seconds.values())
    meta = extractor.metadata()
    return {"images": len(data), "source_size": list(s.source_size), "image_size": s.image_size,
            "model": "vit_small_patch16_224 (random weights)" if not s.vit else f"vit_small_patch16_224 {s.vit}",
            "dtype": meta["dtype"], "device": str(device), "decode_threads": threads, "batch_size": s.batch_size,
            "k": s.tokenize_k, "images_per_s": round(len(data) / total, 1),
            "phase_images_per_s": {p: round(len(data) / t, 1) for p, t in seconds.items()},
            "shares": {p: round(t / total, 3) for p, t in seconds.items()},
            "note": "phases timed one after another (no overlap); extract includes host<->device copies"}


def blobs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """float32 [n, d]: a Gaussian mixture of 4096 components."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4096, d, generator=g)
    return centers[torch.randint(4096, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def inertia(x: torch.Tensor, c: torch.Tensor, device: torch.device) -> float:
    """Mean squared distance of x's rows to their exact nearest centroid."""
    c = c.to(device)
    return sum(float(nearest(x[i:i + 65536].to(device), c)[1].double().sum())
               for i in range(0, x.shape[0], 65536)) / x.shape[0]


def bench_kmeans_plus_plus(x: torch.Tensor, k: int, device: torch.device) -> dict:
    """k-means++ on the fit's init sample (max(20 K, 16384) points of x [N, D]) on the CPU with all threads and
    with one, and on the GPU; the picks must not depend on the thread count."""
    sample = x[:max(20 * k, 16384)]
    threads = torch.get_num_threads()
    runs = {"cpu_all_threads": (threads, "cpu"), "cpu_1_thread": (1, "cpu")}
    if device.type == "cuda":
        runs["cuda"] = (threads, device)
    seconds, picks = {}, {}
    try:
        for name, (n, dev) in runs.items():
            torch.set_num_threads(n)
            sync(device)
            t = time.perf_counter()
            picks[name] = kmeans_plus_plus(sample.to(dev), k, torch.Generator().manual_seed(0)).cpu()
            seconds[name] = round(time.perf_counter() - t, 2)
    finally:
        torch.set_num_threads(threads)
    big = sample.numel() >= kmeanspp.SERIAL_ELEMS
    return {"points": sample.shape[0], "dim": sample.shape[1], "k": k, "threads": threads,
            "loop": "float64, chunked over threads / on the GPU" if big else "float32, single-threaded CPU",
            "seconds": seconds, "threads_agree": bool(torch.equal(picks["cpu_all_threads"], picks["cpu_1_thread"])),
            "cuda_equals_cpu": bool(torch.equal(picks["cuda"], picks["cpu_1_thread"])) if "cuda" in picks else None,
            "cuda_reason": None if "cuda" in picks else "no GPU"}


def bench_kmeans(s: Settings, device: torch.device) -> dict:
    """kmim's fit (mini-batch 8192, k-means++, exact assignment on ``device``) vs faiss.Kmeans (Lloyd, random
    init, all points), the same epochs; inertia measured the same way for both."""
    x = blobs(s.kmeans_points, s.kmeans_dim)
    t = time.perf_counter()
    km = fit_kmeans(x, s.kmeans_k, epochs=s.kmeans_epochs, batch_size=8192, seed=0, device=device)
    kmim_s = time.perf_counter() - t
    faiss = _faiss()
    result = {"points": s.kmeans_points, "dim": s.kmeans_dim, "k": s.kmeans_k, "epochs": s.kmeans_epochs,
              "kmim": {"seconds": round(kmim_s, 2), "device": str(device),
                       "inertia_per_point": inertia(x, km.centroids, device)}}
    gpu_error = None if device.type == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() else "no faiss GPU"
    for gpu in ([True] if gpu_error is None else []) + [False]:
        try:
            t = time.perf_counter()
            fk = faiss.Kmeans(s.kmeans_dim, s.kmeans_k, niter=s.kmeans_epochs, seed=0, gpu=gpu,
                              max_points_per_centroid=s.kmeans_points, verbose=False)
            fk.train(x.numpy())
            seconds = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - e.g. a faiss GPU build without kernels for this GPU
            gpu_error = f"{type(e).__name__}: {e}"[:300]
            continue
        result["faiss"] = {"seconds": round(seconds, 2), "gpu": gpu, "gpu_error": gpu_error,
                           "inertia_per_point": inertia(x, torch.from_numpy(fk.centroids), device)}
        break
    result["kmim_over_faiss_time"] = round(kmim_s / max(seconds, 1e-9), 2)
    result["kmeans_plus_plus"] = bench_kmeans_plus_plus(x, s.kmeans_k, device)
    return result


def peak_bf16(device: torch.device) -> tuple[float | None, str | None]:
    """(peak dense bf16 FLOP/s, None) or (None, why unknown)."""
    if device.type != "cuda":
        return None, "no GPU: MFU is defined against a GPU's bf16 peak"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12, None
    return None, f"bf16 peak of {name!r} not in the table"


def bench_trainer(s: Settings, device: torch.device) -> dict:
    """samples/s and MFU of K-MIM training steps (forward, backward, clip, AdamW) as kmim train runs them."""
    from torch.utils.flop_counter import FlopCounterMode

    setup_distributed(device.type)  # as kmim train: the CUDA device, TF32 on
    torch.manual_seed(0)
    enc = ViTConfig(*s.train_encoder) if s.train_encoder else None
    dec = ViTConfig(*s.train_decoder) if s.train_decoder else None
    model = build_objective("kmim", s.train_model, s.image_size, s.patch_size, s.train_k, encoder=enc,
                            decoder=dec, amp=True).to(device).train()
    opt = make_optimizer(model, SimpleNamespace(lr=1.5e-4, weight_decay=0.05))
    g = torch.Generator().manual_seed(0)
    grid = s.image_size // s.patch_size
    images = torch.randn(s.train_batch, 3, s.image_size, s.image_size, generator=g).to(device)
    tokens = torch.randint(s.train_k, (s.train_batch, grid, grid), generator=g).to(device)

    def step(i: int) -> None:
        out = model(images, tokens, generator=masking_generator(0, 0, i, 0))
        out["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if not math.isfinite(norm.item()):  # the trainer's per-step check (a host sync)
            raise RuntimeError(f"step {i}: non-finite gradient norm")
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step(0)
    for i in range(1, s.train_warmup):
        step(i)
    sync(device)
    t = time.perf_counter()
    for i in range(s.train_steps):
        step(s.train_warmup + i)
    sync(device)
    seconds = time.perf_counter() - t
    flops = counter.get_total_flops() * s.train_steps / seconds
    peak, why = peak_bf16(device)
    return {"objective": "kmim", "model": s.train_model, "encoder": asdict(model.encoder.cfg),
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "image_size": s.image_size,
            "patch_size": s.patch_size, "k": s.train_k, "batch": s.train_batch, "steps": s.train_steps,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32 (autocast is CUDA-only)",
            "samples_per_s": round(s.train_batch * s.train_steps / seconds, 2),
            "model_tflops_per_step": round(counter.get_total_flops() / 1e12, 4),
            "achieved_tflops": round(flops / 1e12, 3), "peak_bf16_tflops": peak / 1e12 if peak else None,
            "mfu": round(flops / peak, 4) if peak else None, "mfu_reason": why,
            "note": "FLOPs counted by torch's FlopCounterMode on one step (matmuls, convolutions, attention)"}


# ---- driver ---------------------------------------------------------------------------------------------


def write(path: Path, results: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small models and data: tests the logic (CPU CI)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    s = TINY if args.tiny else Settings()
    t0 = time.perf_counter()
    results: dict = {"tiny": args.tiny, "settings": asdict(s), "machine": machine(device)}
    with tempfile.TemporaryDirectory(prefix="kmim-gpu-check-") as tmp:
        weights = Path(tmp) / "vit_small_patch16_random.safetensors"
        sections = (("tokens", lambda: check_tokens(s, device, weights)),
                    ("tokenize", lambda: bench_tokenize(s, device, weights)),
                    ("kmeans", lambda: bench_kmeans(s, device)),
                    ("trainer", lambda: bench_trainer(s, device)))
        for name, run in sections:
            t = time.perf_counter()
            try:
                results[name] = run()
            except Exception as e:  # noqa: BLE001 - one failed section must not cost the others' numbers
                traceback.print_exc()
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            results[name]["section_s"] = round(time.perf_counter() - t, 2)
            results["wall_s"] = round(time.perf_counter() - t0, 2)
            write(args.out, results)
    tokens, kpp = results["tokens"], results["kmeans"].get("kmeans_plus_plus", {})
    results["ok"] = ("error" not in tokens and tokens["pixel"]["ok"] and tokens["dino"]["ok"]
                     and kpp.get("threads_agree") is True)
    write(args.out, results)
    print(json.dumps({"ok": results["ok"], "out": str(args.out), "wall_s": results["wall_s"]}))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
