"""Masked-image-modeling objectives sharing one ViT: K-MIM (token CE), MAE (pixel MSE), BEiT (token CE), MaPeT
(two-stream permuted token CE, see :mod:`kmim.trainer.mapet`).

``forward(images [B, 3, H, W] normalized float, tokens [B, h, w] integer or None)`` returns a dict:

- ``loss``: what to backpropagate (the objective's loss plus the weighted MTO loss when MTO is on);
- ``acc``: masked-token (MaPeT: target-token) top-1 accuracy (token objectives only; absent for MAE);
- with MTO: ``loss_main`` (the objective alone), ``mto_loss``, ``mto_spa``, ``mto_e``, ``mto_r`` and
  ``mto_h`` (list of H(0..n)); every entry except ``loss`` is detached.

On CUDA the model runs under bf16 autocast (``amp=True``); losses are computed in float32. On CPU autocast
is off and everything is float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kmim.trainer.mapet import DEFAULT_RECONSTRUCTION_RATIO, cut_point, permutations, two_stream_mask
from kmim.trainer.masking import block_masking, random_masking
from kmim.trainer.mto import MTOConfig, mto_losses
from kmim.trainer.vit import Transformer, ViT, ViTConfig, init_weights, patchify, sincos_pos_embed, vit_config

OBJECTIVES = ("kmim", "mae", "beit", "mapet")
# MAE's decoder is 8 x 512 for ViT-B; the smaller encoders get a lighter one.
_DECODERS = {"tiny": ViTConfig(256, 4, 8), "small": ViTConfig(256, 4, 8), "base": ViTConfig(512, 8, 16)}
_DEFAULT_MASK_RATIO = {"kmim": 0.75, "mae": 0.75, "beit": 0.4, "mapet": DEFAULT_RECONSTRUCTION_RATIO}


def decoder_config(name: str) -> ViTConfig:
    """Default decoder for a named encoder size."""
    if name not in _DECODERS:
        raise ValueError(f"unknown model size {name!r}; expected one of {sorted(_DECODERS)}")
    return _DECODERS[name]


def bf16_autocast(x: torch.Tensor, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA tensors; a disabled context elsewhere."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=enabled and x.device.type == "cuda")


class MIMObjective(nn.Module):
    """Common part: the encoder, optional MTO, autocast and the output dict."""

    def __init__(self, encoder: ViT, mto: MTOConfig | None, amp: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.mto = mto
        self.amp = amp

    def encoder_features(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Unmasked image features [B, D] (float32) for linear probing: see :meth:`ViT.features`."""
        with bf16_autocast(images, self.amp):
            return self.encoder.features(images, pool).float()

    def _flat_tokens(self, tokens: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B, h, w] token grid -> [B, L] long, row-major."""
        if tokens is None:
            raise ValueError(f"{type(self).__name__} needs token grids")
        expected = (batch, *self.encoder.grid)
        if tuple(tokens.shape) != expected:
            raise ValueError(f"token grid shape {tuple(tokens.shape)} is not (batch, *grid) = {expected}")
        return tokens.reshape(batch, -1).long()

    def _result(self, loss: torch.Tensor, acc: torch.Tensor | None, hidden: list[torch.Tensor] | None,
                mask: torch.Tensor) -> dict:
        out: dict = {"loss": loss}
        if acc is not None:
            out["acc"] = acc.detach()
        if self.mto is not None and hidden is not None:
            terms = mto_losses(hidden, mask, self.mto)
            out.update(loss=loss + terms.loss, loss_main=loss.detach(), mto_loss=terms.loss.detach(),
                       mto_spa=terms.spa.detach(), mto_e=terms.e.detach(), mto_r=terms.r.detach(),
                       mto_h=terms.h)
        return out


def token_ce(logits: torch.Tensor, targets: torch.Tensor,
              label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, K], targets [N] -> (cross-entropy, top-1 accuracy)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    with torch.no_grad():
        acc = (logits.argmax(dim=-1) == targets).float().mean()
    return loss, acc


class MaskedDecoder(nn.Module):
    """MAE decoder: project the encoded visible tokens, insert mask tokens, add positions, run blocks, and
    apply the head to the masked positions only."""

    def __init__(self, enc_dim: int, cfg: ViTConfig, grid: tuple[int, int], num_prefix: int,
                 out_dim: int) -> None:
        super().__init__()
        self.num_prefix = num_prefix
        self.embed = nn.Linear(enc_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.dim, *grid)[None], persistent=False)
        self.blocks = Transformer(cfg)
        self.head = nn.Linear(cfg.dim, out_dim)
        init_weights(self)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor,
                with_states: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """latent [B, P + L_keep, De], ids_restore [B, L], mask [B, L] ->
        (predictions for masked patches [N_masked, out_dim] in (b, l) order, hidden states or None)."""
        x = self.embed(latent)
        prefix, vis = x[:, :self.num_prefix], x[:, self.num_prefix:]
        b, length = ids_restore.shape
        fill = self.mask_token.to(vis.dtype).expand(b, length - vis.shape[1], -1)
        x = torch.cat([vis, fill], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1])) + self.pos_embed
        x = torch.cat([prefix, x], dim=1)
        hidden = None
        if with_states:
            states = self.blocks.forward_states(x)
            out, hidden = states.out, [h[:, self.num_prefix:] for h in states.hidden]
        else:
            out = self.blocks(x)
        return self.head(out[:, self.num_prefix:][mask]), hidden


class _EncoderDecoder(MIMObjective):
    """MAE-style: the encoder sees only the visible patches; the decoder fills in mask tokens."""

    def __init__(self, encoder: ViT, decoder: ViTConfig, out_dim: int, mask_ratio: float,
                 mto: MTOConfig | None, amp: bool) -> None:
        super().__init__(encoder, mto, amp)
        self.mask_ratio = mask_ratio
        self.decoder = MaskedDecoder(encoder.cfg.dim, decoder, encoder.grid, encoder.num_prefix, out_dim)

    def _reconstruct(self, images: torch.Tensor, generator: torch.Generator | None
                     ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """-> (predictions [N_masked, out_dim], mask [B, L] bool, decoder hidden states when MTO is on)."""
        enc = self.encoder
        x = enc.embed_patches(images) + enc.pos_embed
        m = random_masking(x.shape[0], x.shape[1], self.mask_ratio, generator=generator, device=x.device)
        x = torch.gather(x, 1, m.ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        latent = enc.blocks(enc.prepend_cls(x))
        pred, hidden = self.decoder(latent, m.ids_restore, m.mask, with_states=self.mto is not None)
        return pred, m.mask, hidden


class KMIM(_EncoderDecoder):
    """K-MIM: predict the discrete token (one of K k-means clusters) of every masked patch."""

    def __init__(self, encoder: ViT, decoder: ViTConfig, k: int, mask_ratio: float = 0.75,
                 label_smoothing: float = 0.0, mto: MTOConfig | None = None, amp: bool = True) -> None:
        super().__init__(encoder, decoder, k, mask_ratio, mto, amp)
        self.label_smoothing = label_smoothing

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None) -> dict:
        targets = self._flat_tokens(tokens, images.shape[0])
        with bf16_autocast(images, self.amp):
            logits, mask, hidden = self._reconstruct(images, generator)
        loss, acc = token_ce(logits, targets[mask], self.label_smoothing)
        return self._result(loss, acc, hidden, mask)


class MAE(_EncoderDecoder):
    """MAE: regress the (optionally per-patch normalized) pixels of every masked patch."""

    def __init__(self, encoder: ViT, decoder: ViTConfig, mask_ratio: float = 0.75, norm_pix_loss: bool = True,
                 mto: MTOConfig | None = None, amp: bool = True) -> None:
        super().__init__(encoder, decoder, encoder.patch_size ** 2 * 3, mask_ratio, mto, amp)
        self.norm_pix_loss = norm_pix_loss

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None) -> dict:
        with bf16_autocast(images, self.amp):
            pred, mask, hidden = self._reconstruct(images, generator)
        target = patchify(images.float(), self.encoder.patch_size)[mask]
        if self.norm_pix_loss:
            # As MAE: unbiased per-patch variance, 1e-6 for flat patches.
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return self._result(F.mse_loss(pred.float(), target), None, hidden, mask)


class BEiT(MIMObjective):
    """BEiT-style: masked patch embeddings are replaced by a learned mask token inside the encoder, and a
    linear head on the encoder output predicts each masked patch's token."""

    def __init__(self, encoder: ViT, k: int, mask_ratio: float = 0.4, masking: str = "block",
                 min_block: int = 16, label_smoothing: float = 0.0, mto: MTOConfig | None = None,
                 amp: bool = True) -> None:
        super().__init__(encoder, mto, amp)
        if masking not in ("block", "random"):
            raise ValueError(f"masking must be 'block' or 'random', got {masking!r}")
        self.mask_ratio = mask_ratio
        self.masking = masking
        self.min_block = min_block
        self.label_smoothing = label_smoothing
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.cfg.dim))
        self.head = nn.Linear(encoder.cfg.dim, k)
        init_weights(self.head)
        nn.init.normal_(self.mask_token, std=0.02)

    def _mask(self, batch: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        """-> [B, L] bool, True = masked."""
        length = self.encoder.num_patches
        if self.masking == "random":
            return random_masking(batch, length, self.mask_ratio, generator=generator, device=device).mask
        num_masked = max(1, round(self.mask_ratio * length))
        return block_masking(batch, *self.encoder.grid, num_masked, min_block=self.min_block,
                             generator=generator, device=device)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None) -> dict:
        targets = self._flat_tokens(tokens, images.shape[0])
        enc = self.encoder
        mask = self._mask(images.shape[0], images.device, generator)
        with bf16_autocast(images, self.amp):
            x = enc.embed_patches(images)
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x) + enc.pos_embed
            x = enc.prepend_cls(x)
            hidden = None
            if self.mto is not None:
                states = enc.blocks.forward_states(x)
                out, hidden = states.out, [h[:, enc.num_prefix:] for h in states.hidden]
            else:
                out = enc.blocks(x)
            logits = self.head(out[:, enc.num_prefix:][mask])
        loss, acc = token_ce(logits, targets[mask], self.label_smoothing)
        return self._result(loss, acc, hidden, mask)


class MaPeT(MIMObjective):
    """MaPeT: two-stream permuted prediction of stored tokens (see :mod:`kmim.trainer.mapet` for the layout and
    the mask)."""

    def __init__(self, encoder: ViT, k: int, cut: int | None = None, reconstruction_ratio: float | None = None,
                 label_smoothing: float = 0.0, mto: MTOConfig | None = None, amp: bool = True) -> None:
        super().__init__(encoder, mto, amp)
        self.cut = cut_point(encoder.num_patches, cut, reconstruction_ratio)
        self.label_smoothing = label_smoothing
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.cfg.dim))
        self.head = nn.Linear(encoder.cfg.dim, k)
        init_weights(self.head)
        nn.init.normal_(self.mask_token, std=0.02)

    def _patch_states(self, seq: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """[B, L, D] sequence -> [B, N, D] in patch order: C for context patches, Q for targets."""
        enc, t = self.encoder, z.shape[1] - self.cut
        patches = seq[:, enc.num_prefix:enc.num_prefix + enc.num_patches]
        index = z[:, self.cut:, None].expand(-1, -1, seq.shape[-1])
        return patches.scatter(1, index, seq[:, seq.shape[1] - t:])

    def predict(self, images: torch.Tensor, generator: torch.Generator | None = None,
                states: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        """(logits [B, T, K] of the targets in permuted order, z [B, N], the layers' patch-order states or None)
        for images [B, 3, S, S]; the permutations are drawn from ``generator``."""
        enc, c = self.encoder, self.cut
        b, t = images.shape[0], enc.num_patches - c
        z, rank = permutations(b, enc.num_patches, generator, images.device)
        mask = two_stream_mask(rank, c, enc.num_prefix)[:, None]  # [B, 1, L, L]
        with bf16_autocast(images, self.amp):
            pos = enc.pos_embed.expand(b, -1, -1)
            m_pos = self.mask_token + pos.gather(1, z[:, c:, None].expand(-1, -1, pos.shape[-1]))
            seq = torch.cat([enc.prepend_cls(enc.embed_patches(images) + enc.pos_embed), m_pos, m_pos], dim=1)
            hidden = None
            if states:
                run = enc.blocks.forward_states(seq, attn_mask=mask)
                out, hidden = run.out, [self._patch_states(h, z) for h in run.hidden]
            else:
                out = enc.blocks(seq, attn_mask=mask)
            return self.head(out[:, out.shape[1] - t:]), z, hidden

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None, *,
                generator: torch.Generator | None = None) -> dict:
        targets = self._flat_tokens(tokens, images.shape[0])
        logits, z, hidden = self.predict(images, generator, states=self.mto is not None)
        loss, acc = token_ce(logits.reshape(-1, logits.shape[-1]), targets.gather(1, z[:, self.cut:]).reshape(-1),
                             self.label_smoothing)
        targets_mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, z[:, self.cut:], True)  # [B, N]
        return self._result(loss, acc, hidden, targets_mask)


def build_objective(name: str, model_size: str = "tiny", image_size: int = 224, patch_size: int = 16,
                    k: int | None = None, mto: MTOConfig | None = None, *, encoder: ViTConfig | None = None,
                    decoder: ViTConfig | None = None, mask_ratio: float | None = None, masking: str = "block",
                    label_smoothing: float = 0.0, norm_pix_loss: bool = True, cls_token: bool = False,
                    cut: int | None = None, amp: bool = True) -> MIMObjective:
    """Build "kmim", "mae", "beit" or "mapet". ``encoder``/``decoder`` replace the configs named by model_size;
    mask_ratio (for mapet: the reconstruction ratio, unless ``cut`` gives c) defaults to 0.75 (kmim, mae), 0.4
    (beit) or 0.7 (mapet); masking applies to beit only."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {list(OBJECTIVES)}")
    if name != "mae" and (k is None or k < 2):
        raise ValueError(f"objective {name!r} needs k >= 2 (the codebook size), got {k}")
    vit = ViT(encoder or vit_config(model_size), image_size, patch_size, cls_token=cls_token)
    ratio = _DEFAULT_MASK_RATIO[name] if mask_ratio is None else mask_ratio
    if name == "beit":
        return BEiT(vit, k, ratio, masking, label_smoothing=label_smoothing, mto=mto, amp=amp)
    if name == "mapet":
        return MaPeT(vit, k, cut, ratio, label_smoothing, mto, amp)
    dec = decoder or decoder_config(model_size)
    if name == "kmim":
        return KMIM(vit, dec, k, ratio, label_smoothing, mto, amp)
    return MAE(vit, dec, ratio, norm_pix_loss, mto, amp)
