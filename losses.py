"""The JEPA loss: L2 prediction error plus SIGReg, one loss with one lambda (LeJEPA, Balestriero & LeCun 2025).

Shape legend (the same letters in every file of the project)
    B   images per process                    R   predictor rows (B x target blocks)
    T   target tokens per row, padded         D   embedding width
    S   samples SIGReg tests (all visible tokens of the global batch, or one pooled row per image)
    L   random slicing directions (num_slices)     J   points t_j of the integration grid (17)

SIGReg in one paragraph. If the embeddings z are isotropic Gaussian, N(0, I), then every 1-D
projection <a, z> with |a| = 1 is N(0, 1), whose characteristic function is phi(t) = exp(-t^2 / 2).
The Epps-Pulley discrepancy measures how far the empirical characteristic function of the S
projected samples, phi_S(t) = (1/S) sum_s exp(i t x_s), is from phi:

    EP(a) = integral |phi_S(t) - phi(t)|^2 w(t) dt  /  integral |1 - phi(t)|^2 w(t) dt,   w(t) = exp(-t^2 / 2)

integrated over t in [-3, 3] by the trapezoid rule on 17 points of [0, 3] (the integrand is even).
SIGReg is the mean of EP over L random unit directions: 0 for Gaussian embeddings (up to a sampling
floor of about 2.6 / S for S independent samples), 1 when every embedding sits at the origin, and
larger than the floor for any shift, scale, low rank or collapse. Driving it down keeps the encoder
from collapsing without a teacher-student trick (LeJEPA Sec. 4).

Why no factor S. LeJEPA's test statistic is S * EP (as a hypothesis test it must be: |phi_S - phi|^2
shrinks like 1/S under the null). As a loss that factor makes SIGReg's gradient grow with S, while
the prediction loss, a mean over target tokens, does not; on patch tokens S runs from about a thousand
(CIFAR-10, batch 32) to 25,000 (ImageNet at 224 px, batch 256), so the right lambda would move with
batch size, image size, patch size and process count. Without it both terms are means over their
samples, so lambda does not scale with S (docs/results.md sweeps it over an 8-fold range of S by
batch size; other resolutions are not swept). Under DDP the loss is exactly the one-process loss on
the global batch, so the process count does not move it either. It is the discrepancy for which
LeJEPA's bounds are stated (Theorems 4 and 6, bias O(1/S)); dividing by the collapse value only
fixes the unit.
"""
import argparse

import torch
import torch.distributed as dist


def epps_pulley_grid(device=None, points=17, t_max=3.0):
    """t_j and the weights omega_j such that sum_j omega_j f(t_j) ~ integral_{-t_max}^{t_max} f(t) w(t) dt
    for even f: trapezoid weights, doubled for the negative half-line, times w(t_j) = exp(-t_j^2 / 2).

    Shape: returns t (J,), omega (J,).
    """
    t = torch.linspace(0.0, t_max, points, device=device)
    dt = t_max / (points - 1)
    trapezoid = torch.full((points,), dt, device=device)
    trapezoid[[0, -1]] = dt / 2
    return t, 2 * trapezoid * torch.exp(-t ** 2 / 2)


def slice_directions(dim, num_slices, generator=None, device=None):
    """L random unit directions a_l in R^D, drawn from `generator` (a CPU generator, so that every
    device and DDP rank draws the same ones from the same seed). Shape: returns (D, L)."""
    directions = torch.randn(dim, num_slices, generator=generator).to(device)
    return directions / directions.norm(dim=0, keepdim=True)


def wave_sums(x, t):
    """sum_s cos(t_j x_sl) and sum_s sin(t_j x_sl): S times the empirical characteristic function.
    Shape: x (S, L), t (J,) -> (2, L, J)."""
    xt = x[:, :, None] * t                                                 # (S, L, J)
    return torch.stack([xt.cos().sum(0), xt.sin().sum(0)])                 # (2, L, J)


def sigreg(z, num_slices=256, generator=None, directions=None):
    """SIGReg(z) = (1/L) sum_l  sum_j omega_j |phi_S,l(t_j) - phi(t_j)|^2  /  sum_j omega_j (1 - phi(t_j))^2,
    phi_S,l(t) = (1/S) sum_s exp(i t <a_l, z_s>), phi(t) = exp(-t^2 / 2),
    with |phi_S - phi|^2 = (mean cos - phi)^2 + (mean sin)^2.

    Under DDP the characteristic-function sums and S are taken over all ranks, so value and gradient
    equal those of one process on the global batch; the caller must give every rank the same
    directions (the same `generator` seed, e.g. from the step).

    Args: directions (D, L) to fix the slices, else L = num_slices random unit directions drawn from
          `generator` (see `slice_directions`).
    Shape: z (S, D) -> scalar.

    Under torch.compile, non-finite input is not checked here (the check is a data-dependent branch,
    a graph break and a host sync every step): train.py checks the embeddings before the loss.
    """
    if not torch.compiler.is_compiling() and not torch.isfinite(z).all():
        raise ValueError("sigreg: embeddings contain NaN or Inf (lower --lr, or use --precision fp32 to find the cause)")
    z = z.float()                                                          # the test needs fp32 even under bf16
    if directions is None:
        directions = slice_directions(z.shape[1], num_slices, generator, z.device)
    t, omega = epps_pulley_grid(z.device)
    phi = torch.exp(-t ** 2 / 2)                                           # (J,)
    with torch.autocast(z.device.type, enabled=False):
        x = z @ directions.to(z)                                           # (S, L)
        # Under torch.compile the plain sums fuse into one loop; eager, the faster path below.
        sums = wave_sums(x, t) if torch.compiler.is_compiling() else _WaveSums.apply(x, t)   # (2, L, J)
        count = torch.tensor(float(z.shape[0]), device=z.device)
        sums, count = _world_sum(sums), _world_sum(count)
        real, imag = sums[0] / count, sums[1] / count                      # (L, J) global ECF
        error = (real - phi) ** 2 + imag ** 2                              # (L, J)
        return (error * omega).sum(1).mean() / (omega * (1 - phi) ** 2).sum()


def prediction_loss(predictions, targets, valid):
    """L2 prediction error, averaged over real target tokens only (padding never counts):
        L_pred = (1 / |valid|) sum_{(r,i) valid} (1/D) ||p_ri - y_ri||^2.

    Under DDP, |valid| counts the tokens of all processes and the local sum is scaled by the world
    size W: DDP averages the W gradients, and the average of W * sum_local / |valid| is the global mean.
    Shape: predictions, targets (R, T, D); valid (R, T) bool -> scalar.
    """
    # Selected, not multiplied by the mask: 0 * inf is NaN, and a padded slot may hold anything.
    error = torch.where(valid[..., None], predictions.float() - targets.float(), 0.0)   # (R, T, D)
    count = _world_sum(valid.sum().float().detach()).clamp(min=1)
    return _world_size() * error.pow(2).mean(-1).sum() / count


def jepa_loss(predictions, targets, target_valid, embeddings, lam=0.1, num_slices=256, generator=None,
              directions=None):
    """The single training loss:  L = (1 - lam) * L_pred + lam * SIGReg(embeddings).

    L_pred compares the predictor's outputs with the target (EMA) encoder's features at the target
    patches; it pulls the context and target views together. SIGReg pushes the context encoder's
    embeddings towards N(0, I), which rules out the collapsed solution (all features equal) that
    L_pred alone admits. Both are means over their samples (see the module docstring), so lam does
    not scale with the number of tokens S or of processes.

    Which embeddings: train.py passes the context encoder's outputs at the real (unpadded) visible
    tokens, one row per token (`--sigreg-on tokens`, the default: every token is a feature the
    predictor reads), or one mean-pooled row per image (`--sigreg-on pooled`, LeJEPA's choice).

    SIGReg's slices come from `generator`, or are given as `directions` (D, L) (see `sigreg`).
    Shape: predictions, targets (R, T, D); target_valid (R, T); embeddings (S, D).
    Returns: (loss, l2, sigreg) as tensors; only `loss` is meant for backward.
    """
    l2 = prediction_loss(predictions, targets, target_valid)
    regularizer = sigreg(embeddings, num_slices, generator, directions)
    return (1 - lam) * l2 + lam * regularizer, l2, regularizer


# ----------------------------------------------------------------------------- plumbing and speed
# Nothing below changes what the loss computes: the sum over DDP ranks, and a faster eager path for
# the wave sums (tested to agree with `wave_sums`).

def _world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient too. A plain dist.all_reduce is
    invisible to autograd: each rank's gradient would then miss the other ranks' terms and, after
    DDP's averaging, come out world-size times too small."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _world_sum(x):
    """Sum over DDP ranks (identity in a single process)."""
    return _SumOverRanks.apply(x) if _world_size() > 1 else x


class _WaveSums(torch.autograd.Function):
    """`wave_sums` whose backward reuses the forward's cosines and sines, since d cos(t x)/dx =
    -t sin(t x) and d sin(t x)/dx = t cos(t x); autograd would evaluate each of them a second time.
    These S * L * J transcendentals are most of SIGReg's cost. Eager mode only: inductor fuses the
    plain `wave_sums` and recomputes them in the backward instead of storing them.

    Shape: x (S, L), t (J,) -> (2, L, J).
    """

    @staticmethod
    def forward(ctx, x, t):
        xt = x[:, :, None] * t                                             # (S, L, J)
        waves = xt.new_empty((2, *xt.shape))                               # (2, S, L, J): cos, sin
        torch.cos(xt, out=waves[0])
        torch.sin(xt, out=waves[1])
        ctx.save_for_backward(waves, t)
        return waves.sum(1)                                                # (2, L, J)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):                                               # grad (2, L, J)
        waves, t = ctx.saved_tensors
        # d/dx_sl sum_j (g_cos cos(t_j x_sl) + g_sin sin(t_j x_sl)) = sum_j t_j (g_sin cos - g_cos sin)
        grad_x = torch.einsum("slj,lj->sl", waves[0], grad[1] * t)
        return grad_x.sub_(torch.einsum("slj,lj->sl", waves[1], grad[0] * t)), None   # (S, L)


def demo():
    """SIGReg on hand-made distributions, printed; writes nothing."""
    g = torch.Generator().manual_seed(0)
    samples, dim = 1024, 64
    gauss = torch.randn(samples, dim, generator=g)
    cases = {
        "N(0, I)": gauss,
        "N(0, I) * 3 (too wide)": gauss * 3,
        "N(0, I) * 0.5 (too narrow)": gauss * 0.5,
        "N(0, I) + 1 (shifted)": gauss + 1,
        "rank 8 (dimensional collapse)": torch.randn(samples, 8, generator=g) @ torch.randn(8, dim, generator=g) / 8 ** 0.5,
        "uniform, unit variance": (torch.rand(samples, dim, generator=g) - 0.5) * 12 ** 0.5,
        "all at the origin (full collapse)": torch.zeros(samples, dim),
        "N(0, I) but 32 points x 32 copies": gauss[:32].repeat_interleave(32, 0),
    }
    print(f"SIGReg of {samples} samples in {dim} dimensions, 256 slices: 0 = Gaussian, 1 = collapsed to the origin")
    print(f"(sampling floor for N(0, I): about 2.6 / {samples} = {2.6 / samples:.4f})")
    for name, z in cases.items():
        value = sigreg(z, generator=torch.Generator().manual_seed(1))
        print(f"  {name:36s} {value.item():8.4f}")
    print("The last row is the floor of 32 independent samples, not 1024: tokens of one image are correlated,\n"
          "so SIGReg on the tokens of a batch sees fewer independent samples than tokens.")


if __name__ == "__main__":
    argparse.ArgumentParser(description="Print SIGReg on hand-made distributions (writes nothing).",
                            allow_abbrev=False).parse_args()
    demo()
