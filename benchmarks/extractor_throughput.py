"""Feature-extractor throughput on the CIFAR subset at image 224, patch 16 (14 x 14 grid), per extractor and model.

For each of pixel, DINO ViT-S/16, DINO ViT-B/16, CLIP ViT-B/16 and CLIP RN50, in one process:

- decode-only: images/s of ``decode_view`` (PNG bytes already in memory -> 224 x 224 uint8 view), best of 3;
- extract-only: images/s of the extractor call on already-decoded uint8 batches ([B, 3, 224, 224] -> features
  on the CPU, host<->device copies included on CUDA);
- end-to-end: decode + extract + exact nearest-centroid assignment (``kmim.tokenizers.assign.nearest``, method
  auto) against a random K=100 codebook of the feature dimension, batch by batch as the tokenize stage does.

No pretrained weights are available offline, so every learned model is built with random weights at its real
size: the real architecture (``timm.create_model(name, pretrained=False)`` / ``open_clip.create_model(name,
pretrained=None)``) is instantiated, its state dict saved to a temporary .safetensors file and passed as
``weights``, so the extractor is built by kmim's own loading path. Throughput does not depend on weight values.

Each timed model phase stops after ``--budget`` seconds once at least 64 images are done; the end-to-end run
then uses the same image count, and the line says ``n_lowered``. Untimed warm-ups: the extractor on a few images
(a full batch on CUDA) and ``nearest`` once for the codebook's shape (it picks faiss or torch by timing both).
``bound`` names the largest end-to-end phase (decode, model or assign). ``load_avg_1m`` is recorded because
other jobs may share the machine. Learned models at ``resample=input`` (the default) see the view resized to
stride x 14: 224 px for the ViTs, 448 px for RN50 (layer4, stride 32).
The pixel extractor runs on the CPU whatever ``--device`` says (as in ``kmim run``).

    .venv/bin/python benchmarks/extractor_throughput.py [--n 512] [--batch-size 32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import CIFAR, emit, machine

from kmim.config import load_config
from kmim.datasets.preprocess import Preprocess, decode_view
from kmim.pipeline.specs import extractor_spec
from kmim.tokenizers.assign import nearest
from kmim.tokenizers.extractors import build_extractor

MODELS = {  # name -> (extractor, model)
    "pixel": ("pixel", None),
    "dino-vit-s16": ("dino", "vit_small_patch16_224.dino"),
    "dino-vit-b16": ("dino", "vit_base_patch16_224.dino"),
    "clip-vit-b16": ("clip", "ViT-B-16"),
    "clip-rn50": ("clip", "RN50"),
}
IMAGE_SIZE, PATCH_SIZE, MIN_IMAGES = 224, 16, 64
RANDOM = "random weights, real architecture"


def random_weights(extractor: str, model: str, folder: Path) -> Path:
    """Save the randomly initialized state dict of the real architecture as .safetensors."""
    from safetensors.torch import save_file

    if extractor == "dino":
        import timm

        net = timm.create_model(model, pretrained=False, num_classes=0)  # DINO checkpoints have no head
        sd = net.state_dict()
    else:
        import open_clip

        net = open_clip.create_model(model, pretrained=None)
        sd = {k: v for k, v in net.state_dict().items() if k.startswith("visual.")}  # image tower only
    path = folder / f"{model.replace('/', '_')}-random.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    del net, sd
    gc.collect()
    return path


def images_tensor(pixels: list[np.ndarray]) -> torch.Tensor:
    """uint8 [B, 3, S, S] from [S, S, 3] views, as the tokenize stage batches them."""
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)


def timed_batches(batches: list, step, budget: float) -> tuple[int, float]:
    """Run ``step`` per batch; stop after ``budget`` s once MIN_IMAGES are done. Returns (images, seconds)."""
    done, t = 0, time.perf_counter()
    for b in batches:
        done += step(b)
        if time.perf_counter() - t > budget and done >= MIN_IMAGES:
            break
    return done, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=512, help="images (the first N of the sorted CIFAR subset)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (learned extractors)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, else fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per timed model phase before N is lowered")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not CIFAR.is_dir():
        raise SystemExit(f"CIFAR subset not found at {CIFAR} (set KMIM_CIFAR)")
    files = sorted(p for p in CIFAR.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:args.n]
    data = [p.read_bytes() for p in files]  # file reads are not timed
    bs = args.batch_size
    pre = Preprocess(IMAGE_SIZE)
    common = {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "batch_size": bs,
              "torch_threads": torch.get_num_threads(), "machine": machine()}

    decode_view(data[0], pre)
    decode_s = float("inf")
    for _ in range(3):  # best of 3 passes: a pass is short, and other jobs may share the machine
        t = time.perf_counter()
        pixels = [decode_view(b, pre).pixels for b in data]
        decode_s = min(decode_s, time.perf_counter() - t)
    decode_rate = len(data) / decode_s
    emit(bench="decode", images=len(data), seconds=round(decode_s, 2), passes=3, images_per_s=round(decode_rate, 1),
         source_size="32x32 PNG", load_avg_1m=os.getloadavg()[0], **common)

    work = Path(tempfile.mkdtemp(prefix="kmim-bench-"))
    try:
        for name in args.models.split(","):
            extractor_name, model = MODELS[name]
            over = {"out": str(work / "out"), "extractor": extractor_name, "image_size": IMAGE_SIZE,
                    "patch_size": PATCH_SIZE, "batch_size": bs}
            weights_s = 0.0
            if model is not None:
                t = time.perf_counter()
                path = random_weights(extractor_name, model, work)
                weights_s = time.perf_counter() - t
                over.update(model=model, weights=str(path), dtype=args.dtype, device=args.device)
            t = time.perf_counter()
            ex = build_extractor(extractor_spec(load_config(None, over)))
            build_s = time.perf_counter() - t
            meta = ex.metadata()
            device = str(ex.device) if model is not None else "cpu"
            params = sum(p.numel() for p in ex.backbone.module.parameters()) if model is not None else 0

            batches = [images_tensor(pixels[i:i + bs]) for i in range(0, len(pixels), bs)]

            def extract(x: torch.Tensor, ex=ex) -> int:
                with torch.inference_mode():
                    ex(x)
                return x.shape[0]

            # Warm-up: a full batch on CUDA (kernel selection is per shape), a few images on the CPU.
            extract(batches[0] if device.startswith("cuda") else batches[0][:4])
            n_model, extract_s = timed_batches(batches, extract, args.budget)
            extract_rate = n_model / extract_s

            gen = torch.Generator().manual_seed(0)
            centroids = torch.randn(args.k, ex.dim, generator=gen)
            if ex.metric == "ip":
                centroids = torch.nn.functional.normalize(centroids, dim=1)
            phases = {"decode": 0.0, "extract": 0.0, "assign": 0.0}
            raw = [data[i:i + bs] for i in range(0, n_model, bs)]

            def end_to_end(chunk: list[bytes], ex=ex, centroids=centroids, phases=phases) -> int:
                t0 = time.perf_counter()
                x = images_tensor([decode_view(b, pre).pixels for b in chunk])
                t1 = time.perf_counter()
                with torch.inference_mode():
                    feats = ex(x)
                t2 = time.perf_counter()
                nearest(feats.reshape(-1, feats.shape[-1]), centroids, metric=ex.metric, method="auto")
                t3 = time.perf_counter()
                for phase, s in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                    phases[phase] += s
                return len(chunk)

            # nearest() times faiss against torch once per (K, dim, metric): do it before the timed run.
            rows = min(n_model, bs) * (IMAGE_SIZE // PATCH_SIZE) ** 2
            nearest(torch.randn(rows, ex.dim, generator=gen), centroids, metric=ex.metric, method="auto")
            t = time.perf_counter()
            n_e2e = sum(end_to_end(chunk) for chunk in raw)
            e2e_s = time.perf_counter() - t
            busy = sum(phases.values())
            lowered = n_model < len(data)
            emit(bench="extractor", name=name, extractor=extractor_name, model=model,
                 weights=RANDOM if model is not None else None, params=params, dim=ex.dim,
                 grid=IMAGE_SIZE // PATCH_SIZE, model_input_size=meta.get("input_size", IMAGE_SIZE), device=device,
                 dtype=meta.get("dtype", "fp32"),
                 decode_images=len(data), decode_images_per_s=round(decode_rate, 1),
                 model_images=n_model, n_lowered=lowered,
                 note=(f"N lowered from {len(data)} to {n_model}: model phase over {args.budget:g} s budget"
                       if lowered else None),
                 extract_images_per_s=round(extract_rate, 2), e2e_images=n_e2e,
                 e2e_images_per_s=round(n_e2e / e2e_s, 2), k=args.k,
                 e2e_shares={p: round(s / busy, 3) for p, s in phases.items()},
                 bound={"decode": "decode", "extract": "model", "assign": "assign"}[max(phases, key=phases.get)],
                 weights_s=round(weights_s, 1), build_s=round(build_s, 1), load_avg_1m=os.getloadavg()[0],
                 **common)
            del ex, batches, centroids
            if model is not None:
                from kmim.tokenizers.learned import cached_extractor

                cached_extractor.cache_clear()
                path.unlink()
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
