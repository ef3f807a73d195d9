"""ViT encoder and narrow ViT predictor for an image JEPA.

Shape legend (the project's; losses.py adds S, L, J)
    B   images per process              H,W image height, width; P patch size
    h,w patch grid (H/P, W/P)           N   patches per image, h * w, numbered row-major
    K   visible context tokens per image, padded to the batch maximum
    M   target blocks per image         T   tokens per target block, padded to the batch maximum
    R   predictor rows, B * M (one row per image and target block)
    D   encoder width                   E   predictor width
    X   tokens in the sequence a Transformer block sees (N, K, or K + T)
    U   real (unpadded) tokens of a batch, packed one after another

Padding: a sample keeps *all* its visible patches. Shorter samples are padded to the batch maximum,
and each padded position is flagged invalid: no real token attends to it (attention mask), and the
losses and pooled features skip it. A sample's outputs are thus the same alone or in any batch.
Inside the Transformer the real tokens are packed (on the CPU always, on a GPU in eager mode; see
TokenLayout and packs_tokens), so padding costs FLOPs only in attention.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# Encoder sizes: tiny/small/base are ViT-Ti/S/B (Touvron et al. 2021; Dosovitskiy et al. 2021).
# Predictor: I-JEPA uses a narrow ViT of width 384 and depth 6-12 (Assran et al. 2023, Sec. 4);
# we keep depth 6 and width 384 for base and scale the width down with the encoder.
PRESETS = {
    "nano":  dict(embed_dim=96,  depth=6,  num_heads=3,  pred_dim=64,  pred_depth=3, pred_heads=2),
    "tiny":  dict(embed_dim=192, depth=12, num_heads=3,  pred_dim=96,  pred_depth=6, pred_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6,  pred_dim=192, pred_depth=6, pred_heads=6),
    "base":  dict(embed_dim=768, depth=12, num_heads=12, pred_dim=384, pred_depth=6, pred_heads=12),
}


# ----------------------------------------------------------------------------- building blocks

def sincos_pos_embed(h, w, dim, device=None):
    """Fixed 2-D sin-cos position embedding (MAE, He et al. 2022): half the channels encode the row,
    half the column, each as [sin(p * f_k), cos(p * f_k)] with f_k = 10000^(-k / (dim/4)).

    Computed for any grid, so a model trained at one resolution runs at another.
    Shape: returns (h * w, dim), row-major like the patches.
    """
    check_width(dim)
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, device=device) / (dim // 4))         # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    angles_r = rows.flatten()[:, None] * freqs                                            # (N, dim/4)
    angles_c = cols.flatten()[:, None] * freqs
    return torch.cat([angles_r.sin(), angles_r.cos(), angles_c.sin(), angles_c.cos()], 1)   # (N, dim)


def check_width(dim):
    """The 2-D sin-cos embedding splits the width in four: row and column, each sin and cos."""
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for the 2-D sin-cos position embedding")


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, layout):
        """Shape: x (U, dim) packed or (B, X, dim) padded, as `layout` says -> the same."""
        qkv = layout.unpack(self.qkv(x))                                        # (B, X, 3 dim)
        b, length, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attend(q, k, v, layout.attn_mask)                                   # (B, heads, X, dim/heads)
        return self.proj(layout.pack(x.transpose(1, 2).reshape(b, length, dim)))   # (U, dim) or (B, X, dim)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, layout):
        x = x + self.attn(self.norm1(x), layout)
        return x + self.mlp(self.norm2(x))


def init_weights(module, blocks):
    """ViT/I-JEPA init, applied once at construction: truncated normal (std 0.02) for linear and conv
    weights, zero biases, unit LayerNorms; the two residual projections of block l are divided by
    sqrt(2 (l + 1)) so the residual stream does not grow with depth (I-JEPA's `fix_init_weight`)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            block.attn.proj.weight.div_(math.sqrt(2.0 * (layer + 1)))
            block.mlp.fc2.weight.div_(math.sqrt(2.0 * (layer + 1)))


# ----------------------------------------------------------------------------- encoder

class Encoder(nn.Module):
    """ViT encoder without CLS token: patchify, add sin-cos positions, keep the visible patches,
    run the Transformer. The same module is the context encoder (kept patches only) and, as an EMA
    copy, the target encoder (all patches)."""

    def __init__(self, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, in_chans=3):
        super().__init__()
        check_width(embed_dim)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.mlp_ratio = mlp_ratio
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)
        init_weights(self, self.blocks)

    def grid(self, height, width):
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {self.patch_size}: "
                             f"change --img-size or --patch-size")
        return height // self.patch_size, width // self.patch_size

    def forward(self, images, keep_idx=None, keep_valid=None):
        """Shape: images (B, 3, H, W); keep_idx, keep_valid (B, K) or None (keep all N) -> (B, K, D).
        Padded positions hold 0 when the tokens are packed and arbitrary values otherwise: callers
        read only the valid ones."""
        h, w = self.grid(*images.shape[-2:])
        # The residual stream stays fp32 under bf16 autocast (as in ViT and I-JEPA): only the matmuls
        # inside the blocks run in bf16, and each block adds its output to the fp32 stream.
        x = self.patch_embed(images).flatten(2).transpose(1, 2).float()         # (B, N, D)
        x = x + sincos_pos_embed(h, w, self.embed_dim, x.device)
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
        layout = TokenLayout(keep_valid)
        x = layout.pack(x)                                                       # (U, D) or (B, K, D)
        for block in self.blocks:
            x = block(x, layout)
        return layout.unpack(self.norm(x))                                       # (B, K, D)

# ----------------------------------------------------------------------------- predictor

class Predictor(nn.Module):
    """Narrow ViT that predicts target-encoder features at the target positions (I-JEPA Sec. 3).

    Input per row (one row per sample and target block): the sample's context tokens, projected to
    width E and tagged with their positions, followed by one learned mask token per target patch,
    tagged with that patch's position. Output: the mask tokens' final states, projected back to D.
    """

    def __init__(self, embed_dim=384, pred_dim=192, depth=6, num_heads=6, mlp_ratio=4.0):
        super().__init__()
        check_width(pred_dim)
        self.pred_dim, self.mlp_ratio = pred_dim, mlp_ratio
        self.embed = nn.Linear(embed_dim, pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(pred_dim))
        self.blocks = nn.ModuleList(Block(pred_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(pred_dim)
        self.proj = nn.Linear(pred_dim, embed_dim)
        init_weights(self, self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, context, context_idx, context_valid, target_idx, target_valid, grid):
        """Shape: context (B, K, D); context_idx, context_valid (B, K); target_idx, target_valid
        (R, T) with R = B * M, row b * M + m for sample b, block m; grid (h, w) -> (R, T, D)."""
        num_blocks = target_idx.shape[0] // context.shape[0]
        pos = sincos_pos_embed(*grid, self.pred_dim, context.device)           # (N, E), fp32 like the stream
        x = self.embed(context) + pos[context_idx]                              # (B, K, E)
        x = x.repeat_interleave(num_blocks, 0)                                  # (R, K, E)
        queries = self.mask_token + pos[target_idx]                             # (R, T, E)
        x = torch.cat([x, queries], 1)                                          # (R, K + T, E)
        valid = torch.cat([context_valid.repeat_interleave(num_blocks, 0), target_valid], 1)
        layout = TokenLayout(valid)
        x = layout.pack(x)                                                       # (U, E) or (R, K + T, E)
        for block in self.blocks:
            x = block(x, layout)
        return self.proj(self.norm(layout.unpack(x)[:, context.shape[1]:]))   # (R, T, D)

# ----------------------------------------------------------------------------- presets

def preset(name, **overrides):
    """The preset's sizes with every non-None override applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}': choose one of {', '.join(PRESETS)}")
    return {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}}


def build_encoder(name, img_size, patch_size, embed_dim=None, depth=None, num_heads=None):
    """An Encoder of preset `name`; raises ValueError if img_size is not a multiple of patch_size."""
    sizes = preset(name, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    encoder = Encoder(patch_size, sizes["embed_dim"], sizes["depth"], sizes["num_heads"])
    encoder.grid(img_size, img_size)
    return encoder


def build_predictor(name, embed_dim=None, pred_dim=None, pred_depth=None, pred_heads=None):
    sizes = preset(name, embed_dim=embed_dim, pred_dim=pred_dim, pred_depth=pred_depth, pred_heads=pred_heads)
    return Predictor(sizes["embed_dim"], sizes["pred_dim"], sizes["pred_depth"], sizes["pred_heads"])


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- faster paths: token packing and the CPU-bf16 attention, behind the interface used above

class TokenLayout:
    """Where the real tokens of a padded (B, X) batch sit.

    Layer norms, linear layers and the MLP treat tokens one by one, so they run on the packed real
    tokens, (U, width) with U = sum of the valid flags, and spend nothing on padding; only attention,
    which mixes the tokens of one sample, needs them in padded (B, X, width) form, with padded keys
    masked out. See `packs_tokens` for when.
    """

    def __init__(self, valid):
        self.attn_mask = None if valid is None else valid[:, None, None, :]     # (B, 1, 1, X), True = real key
        self.packed = valid is not None and packs_tokens(valid.device, torch.compiler.is_compiling())
        self.index = real_positions(valid) if self.packed else None             # (U,)

    def pack(self, x):
        """(B, X, width) -> (U, width) when packed, else unchanged."""
        return x.flatten(0, 1)[self.index] if self.packed else x

    def unpack(self, x):
        """(U, width) -> (B, X, width) with zeros at padding when packed, else unchanged."""
        if not self.packed:
            return x
        batch, length = self.attn_mask.shape[0], self.attn_mask.shape[-1]
        padded = x.new_zeros(batch * length, x.shape[-1])
        return padded.index_copy(0, self.index, x).view(batch, length, -1)


def packs_tokens(device, compiled):
    """Whether TokenLayout packs the real tokens. Packing needs their count U on the host, which
    varies every step: free on the CPU, where a compiled graph then takes U as a dynamic size; a
    sync on a GPU, tolerated in eager mode but not in a compiled graph, which keeps fixed padded
    (bucketed) shapes there instead."""
    return device.type == "cpu" or not compiled


@torch.compiler.disable  # nonzero's output length depends on the data: computed outside any graph
def real_positions(valid):
    """Flat indices of the True entries of `valid`. Shape: (B, X) -> (U,)."""
    return valid.flatten().nonzero().squeeze(1)


def attend(q, k, v, key_valid):
    """F.scaled_dot_product_attention with padded keys masked out: fused kernels, no probabilities
    stored. On a CPU in bf16 the fused kernel and its math path run slower than attention written
    out with matmuls at these short lengths, so there it is written out."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return explicit_attention(q, k, v, key_valid)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid)


def explicit_attention(q, k, v, key_valid):
    """softmax(Q K^T / sqrt(d) + mask) V (Vaswani et al. 2017), with mask = -inf at padded keys.

    Under bf16 autocast the scores are rounded to bf16 before the softmax, as in any attention
    written with matmuls (nanoGPT's non-flash path); fused kernels keep them in fp32.
    Shape: q, k, v (B, heads, X, d); key_valid (B, 1, 1, X) or None -> (B, heads, X, d).
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)                  # (B, heads, X, X)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid, float("-inf"))
    return scores.softmax(-1) @ v


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Print the model presets: widths, depths and parameter counts of encoder and predictor "
                    "(FLOPs: bench.py). Writes nothing.", allow_abbrev=False)
    parser.parse_args(argv)
    print(f"{'preset':6} {'D':>4} {'depth':>5} {'heads':>5} {'E':>4} {'pred depth':>10} {'enc params':>11} "
          f"{'pred params':>11}")
    for name, sizes in PRESETS.items():
        encoder, predictor = build_encoder(name, 224, 16), build_predictor(name)
        print(f"{name:6} {sizes['embed_dim']:>4} {sizes['depth']:>5} {sizes['num_heads']:>5} "
              f"{sizes['pred_dim']:>4} {sizes['pred_depth']:>10} {count_params(encoder) / 1e6:>10.2f}M "
              f"{count_params(predictor) / 1e6:>10.2f}M")


if __name__ == "__main__":
    main()
