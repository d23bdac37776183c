"""Residual invertible attention (Zha et al. 2021, "Invertible Attention", arXiv 2106.09003).

y = x + g(x), g = Γ(o), o[:, j] = Σ_i v[:, i] · A[i, j], A[i, j] = E[i, j] / (1.5 Σ_i' E[i', j])
over the N = H·W positions (SPEC §2.1), with the four energies of the paper. Faithful to the
validation code Schwartz-Zha/InvertibleAttention, plus a certified-contractive variant (SPEC §2.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from .residual import ResidualLayer
from .spectral import SNConv1x1

KINDS = ("dot", "embedded", "gaussian", "concat")
LIPSCHITZ = ("faithful", "certified")
GATES = ("conv", "gamma")


class ResidualAttention(ResidualLayer):
    """Residual attention y = x + g(x), ``kind`` ∈ dot | embedded | gaussian | concat.

    Energies E[i, j] (positions i, j; q, k: spectrally normalised 1×1 convs C → C/``reduction``):

    - gaussian: exp(x_i · x_j);  embedded: exp(q_i · k_j);  dot: ELU(q_i · k_j);
    - concat: ELU(w · [q_i; k_j]) = ELU(a·q_i + b·k_j) (never builds the N×N×2C/4 tensor).

    v is a 1×1 conv C → C; Γ is a 1×1 conv (gate="conv") or tanh(γ)·o with γ = 0 at init
    (gate="gamma"; identity at init). Every conv has soft spectral normalisation
    W ← W / max(1, σ̂/c), c = 0.9 (0.5 on the value conv of dot), σ̂ from 5 power iterations.
    Default gate as in the validation code: "gamma" for gaussian, "conv" otherwise.
    The exp energies are computed as a column softmax (same values; no overflow to inf/nan).

    ``lipschitz="faithful"`` is the published construction: nothing bounds Lip(g) (at random
    init dot and concat are not contractive and the inverse diverges; gaussian and embedded are
    contractive only for small inputs). ``lipschitz="certified"`` makes Lip(g) ≤ c_cert (0.9)
    on every input of R^{C×H×W}, by construction:

    1. tokens s = tanh(x)/√C, so ‖s_i‖₂ ≤ 1 for every position and Lip(x ↦ s) = 1/√C;
    2. positive energies with |d log E / d l| ≤ 1: exp for gaussian/embedded, ELU(l) + 1 for
       dot/concat; logits l built from s (gaussian: s_i·s_j), values v = W_v s + b_v;
    3. with |l| ≤ M on the domain and ρ = max E / min E (e^{2M}, resp. (1 + M)e^M), every column
       of P = E / Σ_i E sums to 1 and P_ij ≤ ρ/N, so ‖P‖₂ ≤ √(‖P‖₁‖P‖_∞) ≤ √ρ (independent of N);
       with |dl_ij| ≤ a‖ds_i‖ + b‖ds_j‖ and ‖v_i − v̄_j‖ ≤ D_v = 2σ_v,
           Lip(s ↦ o) ≤ (2/3) · (σ_v √ρ + D_v (a √ρ + b)),
       where (Q = σ_q + ‖b_q‖, K = σ_k + ‖b_k‖): dot/embedded M = QK, a = σ_q K, b = Q σ_k;
       concat (w = [α; β]) M = ‖α‖Q + ‖β‖K, a = ‖α‖σ_q, b = ‖β‖σ_k; gaussian M = a = b = 1;
    4. L̂ = σ_Γ · Lip(s ↦ o) / √C (σ_Γ = ‖W_Γ‖₂ or |tanh γ|; all σ are exact spectral norms of
       the effective weights, by SVD) and g = min(1, c_cert / L̂) · Γ(o), so Lip(g) ≤ c_cert.

    The derivation follows the column-normalisation argument of Kim et al. 2021 ("The Lipschitz
    constant of self-attention", ICML), made N-independent by the bounded token domain. The bound
    is conservative (the measured ‖J_g‖₂ is typically several times smaller).

    Shapes: x is B×C×H×W (any H, W), C ≥ ``reduction`` unless kind is gaussian.
    """

    def __init__(self, channels: int, kind: str = "dot", *, lipschitz: str = "faithful",
                 gate: str | None = None, reduction: int = 4, coeff: float = 0.9,
                 value_coeff: float | None = None, certified_coeff: float = 0.9,
                 num_power_iterations: int = 5, **residual_kwargs: object) -> None:
        super().__init__(**residual_kwargs)  # type: ignore[arg-type]
        if kind not in KINDS:
            raise ConfigError(f"attention kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if lipschitz not in LIPSCHITZ:
            raise ConfigError(f"lipschitz must be 'faithful' or 'certified', got {lipschitz!r}")
        gate = ("gamma" if kind == "gaussian" else "conv") if gate is None else gate
        if gate not in GATES:
            raise ConfigError(f"gate must be 'conv' or 'gamma', got {gate!r}")
        inner = channels // reduction
        if kind != "gaussian" and inner < 1:
            raise ConfigError(f"{kind} attention needs channels ≥ reduction ({reduction}), "
                              f"got {channels}")
        self.channels = channels
        self.kind = kind
        self.lipschitz = lipschitz
        self.gate = gate
        self.certified_coeff = certified_coeff
        sn = {"num_power_iterations": num_power_iterations}
        if value_coeff is None:
            value_coeff = 0.5 if kind == "dot" else coeff
        if kind != "gaussian":
            self.query = SNConv1x1(channels, inner, coeff, **sn)
            self.key = SNConv1x1(channels, inner, coeff, **sn)
        if kind == "concat":
            self.concat = SNConv1x1(2 * inner, 1, coeff, bias=False, **sn)
        self.value = SNConv1x1(channels, channels, value_coeff, **sn)
        if gate == "conv":
            self.gamma_conv = SNConv1x1(channels, channels, coeff, **sn)
        else:
            self.gamma = nn.Parameter(torch.zeros(1))

    # --- the branch --------------------------------------------------------------------------
    def _weights(self) -> dict[str, Tensor]:
        names = ["value"] + (["query", "key"] if self.kind != "gaussian" else [])
        names += ["concat"] if self.kind == "concat" else []
        names += ["gamma_conv"] if self.gate == "conv" else []
        return {n: getattr(self, n).effective_weight() for n in names}

    def branch(self, x: Tensor) -> Tensor:
        """g(x), B×C×H×W."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ShapeError(f"ResidualAttention({self.channels}) expects B×{self.channels}×H×W, "
                             f"got {tuple(x.shape)}")
        weights = self._weights()
        certified = self.lipschitz == "certified"
        tokens, logits = self._logits(x, weights)
        values = self.value(tokens if certified else x.flatten(2), weights["value"])
        if self.kind in ("gaussian", "embedded"):
            attn = torch.softmax(logits, dim=1)  # = E / Σ_i E for E = exp(l)
            out = (values @ attn) * (2.0 / 3.0)
        else:
            # ELU's backward only needs its output, so it may overwrite the logits.
            energy = F.elu(logits) + 1.0 if certified else F.elu(logits, inplace=True)
            # o[:, j] = Σ_i v_i E_ij / (1.5 Σ_i E_ij): divide the C×N product, not the N×N matrix.
            out = (values @ energy) / (1.5 * energy.sum(dim=1, keepdim=True))
        if self.gate == "conv":
            out = self.gamma_conv(out, weights["gamma_conv"])
        else:
            out = torch.tanh(self.gamma) * out
        if certified:
            bound = self.lipschitz_bound(weights)
            out = out * torch.clamp(self.certified_coeff / bound.clamp_min(1e-12), max=1.0)
        return out.reshape(x.shape)

    def _logits(self, x: Tensor, weights: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(tokens B×C×N — tanh(x)/√C when certified —, logits l B×N×N)."""
        tokens = x.flatten(2)  # B×C×N
        if self.lipschitz == "certified":
            tokens = torch.tanh(tokens) / math.sqrt(self.channels)
        if self.kind == "gaussian":
            return tokens, tokens.transpose(1, 2) @ tokens  # l[i, j] = s_i · s_j
        q = self.query(tokens, weights["query"])
        k = self.key(tokens, weights["key"])
        if self.kind == "concat":
            inner = q.shape[1]
            w = weights["concat"].reshape(-1)
            a = torch.einsum("c,bcn->bn", w[:inner], q)
            b = torch.einsum("c,bcn->bn", w[inner:], k)
            return tokens, a.unsqueeze(2) + b.unsqueeze(1)
        return tokens, q.transpose(1, 2) @ k

    def attention_map(self, x: Tensor) -> Tensor:
        """P[i, j] = E[i, j] / Σ_i' E[i', j], B×N×N over the N = H·W positions (row-major):
        column j is the distribution over source positions i that output position j averages
        the values over (o[:, j] = c · Σ_i v_i P[i, j], c = 2/3), for the input x. For the
        faithful dot / concat energies ELU(l) can be negative, so a column sums to 1 but may
        hold negative weights."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ShapeError(f"ResidualAttention({self.channels}) expects B×{self.channels}×H×W, "
                             f"got {tuple(x.shape)}")
        _, logits = self._logits(x, self._weights())
        if self.kind in ("gaussian", "embedded"):
            return torch.softmax(logits, dim=1)
        energy = F.elu(logits) + 1.0 if self.lipschitz == "certified" else F.elu(logits)
        return energy / energy.sum(dim=1, keepdim=True)

    # --- certification -----------------------------------------------------------------------
    def lipschitz_bound(self, weights: dict[str, Tensor] | None = None) -> Tensor:
        """L̂ ≥ Lip(Γ ∘ o ∘ s) of the certified branch before its c/L̂ scale (class docstring).

        The certified g satisfies Lip(g) ≤ min(L̂, ``certified_coeff``) on all of R^{C×H×W}.
        """
        if self.lipschitz != "certified":
            raise ConfigError("lipschitz_bound is defined for lipschitz='certified' only; the "
                              "faithful branch has no global bound (use jacobian_norm)")
        weights = self._weights() if weights is None else weights

        def norm(name: str) -> Tensor:
            return torch.linalg.matrix_norm(weights[name], ord=2)

        sigma_v = norm("value")
        if self.kind == "gaussian":
            m = a = b = sigma_v.new_tensor(1.0)
        else:
            sigma_q, sigma_k = norm("query"), norm("key")
            big_q = sigma_q + self.query.bias.norm()
            big_k = sigma_k + self.key.bias.norm()
            if self.kind == "concat":
                w = weights["concat"].reshape(-1)
                inner = w.numel() // 2
                alpha, beta = w[:inner].norm(), w[inner:].norm()
                m = alpha * big_q + beta * big_k
                a, b = alpha * sigma_q, beta * sigma_k
            else:
                m = big_q * big_k
                a, b = sigma_q * big_k, big_q * sigma_k
        if self.kind in ("gaussian", "embedded"):
            sqrt_rho = torch.exp(m)
        else:
            sqrt_rho = torch.sqrt((1.0 + m) * torch.exp(m))
        lip_o = (2.0 / 3.0) * (sigma_v * sqrt_rho + 2.0 * sigma_v * (a * sqrt_rho + b))
        sigma_gate = norm("gamma_conv") if self.gate == "conv" else torch.tanh(self.gamma).abs()[0]
        return sigma_gate * lip_o / math.sqrt(self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kind={self.kind}, lipschitz={self.lipschitz}, " \
               f"gate={self.gate}, logdet={self.logdet}"
