"""The JEPA loss: L2 prediction error plus SIGReg, one loss with one lambda (LeJEPA, Balestriero & LeCun 2025).

Shape legend
    R   rows of predictions (samples x target blocks)     T   target tokens per row, padded
    D   embedding width                                   S   samples SIGReg tests (images or tokens)
    M   random slicing directions (num_slices; not the   J   points t_j of the integration grid (17)
        target blocks M of masks.py)

SIGReg in one paragraph. If the embeddings z are isotropic Gaussian, N(0, I), then every 1-D
projection <a, z> with |a| = 1 is N(0, 1), whose characteristic function is phi(t) = exp(-t^2 / 2).
The Epps-Pulley statistic measures how far the empirical characteristic function of S projected
samples, phi_S(t) = (1/S) sum_s exp(i t x_s), is from phi:

    EP(a) = S * integral |phi_S(t) - phi(t)|^2 w(t) dt,      w(t) = exp(-t^2 / 2)

integrated over t in [-3, 3] by the trapezoid rule on 17 points of [0, 3] (the integrand is even).
SIGReg is the mean of EP over M random unit directions. It is about 1 for Gaussian input and
grows for any shift, scale, low rank or collapse; driving it down keeps the encoder from
collapsing without a teacher-student trick (LeJEPA Sec. 4).
"""
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
    """sum_s cos(t_j x_sm) and sum_s sin(t_j x_sm), the unnormalised empirical characteristic function.

    Its backward reuses the forward's cosines and sines, since d cos(t x)/dx = -t sin(t x) and
    d sin(t x)/dx = t cos(t x); autograd would evaluate each of them a second time. These S * M * J
    transcendentals (11 million per step for CIFAR-10's tokens) are most of SIGReg's cost. Eager
    mode only: under torch.compile, `sigreg` writes the sums plainly (see there).

    Shape: x (S, M), t (J,) -> (2, M, J).
    """

    @staticmethod
    def forward(ctx, x, t):
        xt = x[:, :, None] * t                                             # (S, M, J)
        waves = xt.new_empty((2, *xt.shape))                               # (2, S, M, J): cos, sin
        torch.cos(xt, out=waves[0])
        torch.sin(xt, out=waves[1])
        ctx.save_for_backward(waves, t)
        return waves.sum(1)                                                # (2, M, J)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):                                               # grad (2, M, J)
        waves, t = ctx.saved_tensors
        # d/dx_sm sum_j (g_cos cos(t_j x_sm) + g_sin sin(t_j x_sm)) = sum_j t_j (g_sin cos - g_cos sin)
        grad_x = torch.einsum("smj,mj->sm", waves[0], grad[1] * t)
        return grad_x.sub_(torch.einsum("smj,mj->sm", waves[1], grad[0] * t)), None   # (S, M)


def slice_directions(dim, num_slices, generator=None, device=None):
    """M random unit directions a_m in R^D, drawn from `generator` (a CPU generator, so that every
    device and DDP rank draws the same ones from the same seed). Shape: returns (D, M)."""
    directions = torch.randn(dim, num_slices, generator=generator).to(device)
    return directions / directions.norm(dim=0, keepdim=True)


def sigreg(z, num_slices=256, generator=None, directions=None):
    """SIGReg(z) = (1/M) sum_m  S * sum_j omega_j |phi_S,m(t_j) - exp(-t_j^2 / 2)|^2,
    phi_S,m(t) = (1/S) sum_s exp(i t <a_m, z_s>), with |phi_S - phi|^2 = (mean cos - phi)^2 + (mean sin)^2.

    Under DDP, S and the characteristic-function sums are taken over all ranks, so value and
    gradient equal those of one process on the global batch; the caller must give every rank the
    same directions (the same `generator` seed, e.g. from the step).

    Args: directions (D, M) to fix the slices, else M = num_slices random unit directions drawn from
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
    with torch.autocast(z.device.type, enabled=False):
        x = z @ directions.to(z)                                           # (S, M)
        if torch.compiler.is_compiling():
            # Written plainly, inductor fuses each pass into one loop and recomputes the cosines and
            # sines in the backward instead of storing S x M x J of each: forward + backward took 12 ms
            # against 33 ms for _WaveSums compiled, at the tiny preset's S = 980 tokens (README, Performance)
            xt = x[:, :, None] * t                                         # (S, M, J)
            sums = torch.stack([xt.cos().sum(0), xt.sin().sum(0)])         # (2, M, J)
        else:
            sums = _WaveSums.apply(x, t)                                   # (2, M, J)
        count = torch.tensor(float(z.shape[0]), device=z.device)
        sums, count = _world_sum(sums), _world_sum(count)
        real, imag = sums[0] / count, sums[1] / count                      # (M, J) global ECF
        error = (real - torch.exp(-t ** 2 / 2)) ** 2 + imag ** 2           # (M, J)
        return (count * (error * omega).sum(1)).mean()


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


def jepa_loss(predictions, targets, target_valid, embeddings, lam=0.05, num_slices=256, generator=None,
              directions=None):
    """The single training loss:  L = (1 - lam) * L_pred + lam * SIGReg(embeddings).

    L_pred compares the predictor's outputs with the target (EMA) encoder's features at the target
    patches; it pulls the context and target views together. SIGReg pushes the context encoder's
    embeddings towards N(0, I), which rules out the collapsed solution (all features equal) that
    L_pred alone admits. lam = 0.05 is LeJEPA's default (Sec. 5).

    Which embeddings: train.py passes the context encoder's outputs at the real (unpadded) visible
    tokens, one row per token (`--sigreg-on tokens`, the default: many samples per step, and every
    token is a feature the predictor reads), or one mean-pooled row per image (`--sigreg-on pooled`,
    the per-image embedding of LeJEPA). The README's ablation compares the two. Mind the factor S
    in SIGReg: on tokens S is about K times the batch, and tokens of one image are correlated, so
    the statistic never gets near 1 and its gradient outweighs L_pred's by orders of magnitude. With
    Adam, which divides out the gradient's scale, the runs for lam from 5e-4 to 0.3 were then the
    same run in the README's ablation, and the prediction barely steered the encoder. On CIFAR-10
    the README's recipe therefore uses lam = 1e-4, where both terms shape the encoder; the default
    stays LeJEPA's value, since that balance depends on the number of tokens per batch.

    SIGReg's slices come from `generator`, or are given as `directions` (D, M) (see `sigreg`).
    Shape: predictions, targets (R, T, D); target_valid (R, T); embeddings (S, D).
    Returns: (loss, l2, sigreg) as tensors; only `loss` is meant for backward.
    """
    l2 = prediction_loss(predictions, targets, target_valid)
    regularizer = sigreg(embeddings, num_slices, generator, directions)
    return (1 - lam) * l2 + lam * regularizer, l2, regularizer


if __name__ == "__main__":
    # SIGReg on hand-made distributions: ~1 for N(0, I), larger the further from it.
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
        "constant (full collapse)": torch.ones(samples, dim),
        "N(0, I) but 32 points x 32 copies": gauss[:32].repeat_interleave(32, 0),
    }
    print(f"SIGReg with {samples} samples in {dim} dimensions, 256 slices (its mean is 1.05 for N(0, I))")
    for name, z in cases.items():
        value = sigreg(z, generator=torch.Generator().manual_seed(1))
        print(f"  {name:34s} {value.item():10.3f}")
    print("The last row is why SIGReg on the tokens of a batch stays well above 1 in training: tokens of one\n"
          "image are correlated, so S tokens carry the information of fewer independent samples.")
