"""moescope: expert-geometry measures of Mixture-of-Experts models.

The functions take numpy arrays, torch tensors (read through DLPack or
``__array__``, without a copy when they are on the CPU and C-contiguous) or
nested lists, in float32 or float64, and return numpy arrays and plain dicts.
They run the moescope Rust library, the same code as the ``moescope`` command
line, with the GIL released. Every measure is defined, with its chance level,
in the repository's docs/MEASURES.md; the formulas are repeated below.

Errors are Python exceptions with the library's message: ``ValueError`` for
bad arguments (the message names the argument and the shape it expects) and
for missing or malformed files (the message names the file), ``OSError`` for
files that cannot be read, ``RuntimeError`` for other failures.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _native

__version__ = _native.__version__
__all__ = [
    "weight_overlap",
    "weight_chance",
    "orth_loss",
    "activation_overlap",
    "routing_telemetry",
    "jacobian_alignment",
    "subspaces",
    "analyze",
    "load_run",
    "Run",
    "WeightOverlap",
]

ArrayLike = Any


def _as_array(x: ArrayLike, name: str, floating: bool = True) -> np.ndarray:
    """A C-contiguous numpy array of ``x``, copying only when it must.

    torch tensors are detached and moved to the CPU; bfloat16 and float16
    become float32; other non-float dtypes become float64 (``floating``) or
    int64.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        t = x.detach().cpu()
        if floating and str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        try:
            a = np.from_dlpack(t.contiguous())
        except (AttributeError, TypeError, RuntimeError, BufferError):
            a = t.contiguous().numpy()
    else:
        a = np.asarray(x)
    if floating:
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32 if a.dtype == np.float16 else np.float64)
    else:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name}: expected integer expert indices, got dtype {a.dtype}")
        a = a.astype(np.int64, copy=False)
    return np.ascontiguousarray(a)


def _selection(selected, name: str = "selected") -> np.ndarray:
    """Expert indices as an (n, k) int64 array; a 1-D array is one expert per token."""
    sel = _as_array(selected, name, floating=False)
    if sel.ndim == 1:
        sel = sel[:, None]
    if sel.ndim != 2:
        raise ValueError(f"{name}: expected expert indices of shape (n, k), got shape {sel.shape}")
    return sel


def _probabilities(probs, name: str = "probs") -> np.ndarray:
    p = _as_array(probs, name).astype(np.float32, copy=False)
    if p.ndim != 2:
        raise ValueError(f"{name}: expected router probabilities of shape (n, E), got shape {p.shape}")
    return p


def _matrix(rows: Sequence[Sequence[Optional[float]]]) -> np.ndarray:
    """A nested list with nulls as a float64 array with NaN."""
    return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)


class WeightOverlap(tuple):
    """``(matrix, mso)``, with the chance level as ``.chance``.

    Unpacks as a pair: ``matrix, mso = weight_overlap(experts)``.
    """

    def __new__(cls, matrix: np.ndarray, mso: float, chance: float):
        self = super().__new__(cls, (matrix, mso))
        self.chance = chance
        return self

    @property
    def matrix(self) -> np.ndarray:
        return self[0]

    @property
    def mso(self) -> float:
        return self[1]


def _experts(experts: Union[ArrayLike, Sequence[ArrayLike]], name: str = "experts") -> np.ndarray:
    if isinstance(experts, (list, tuple)):
        experts = np.stack([_as_array(e, f"{name}[{i}]") for i, e in enumerate(experts)])
    return _as_array(experts, name)


def weight_overlap(experts, granularity: str = "flat") -> WeightOverlap:
    """Weight overlap of the experts' matrices.

    ``experts``: an (E, R, C) array (one R × C matrix per expert, e.g. the
    up-projections W_up,e of shape (d_ff, d)), an (E, P) array of flattened
    vectors, or a list of E matrices.

    ``granularity`` cuts each matrix into S vectors u_e^(s) of length L:
    ``flat`` (S = 1, the whole matrix, L = R·C), ``rows`` (S = R, L = C) or
    ``cols`` (S = C, L = R). Then

        MSO = 2 / (E(E−1)) · Σ_{i<j} (1/S) Σ_s cos²(u_i^(s), u_j^(s))

    Returns ``(matrix, mso)``: for ``flat`` the E×E cosine matrix
    G_ij = ⟨w_i/‖w_i‖, w_j/‖w_j‖⟩ (ones on the diagonal); for ``rows`` and
    ``cols`` each pair's mean cos² over slices (ones on the diagonal; an
    all-zero expert has cosine 0 with everything, itself included).
    ``.chance`` is the value for independent isotropic random matrices,
    E[cos²] = 1/L. Accumulation is in float64.
    """
    a = _experts(experts)
    matrix, mso = _native.weight_overlap(a, granularity)
    return WeightOverlap(matrix, mso, _native.weight_chance(list(a.shape), granularity))


def weight_chance(shape: Sequence[int], granularity: str = "flat") -> float:
    """1/L: the weight MSO of independent random matrices of ``shape`` ((E, R, C) or (E, P))."""
    return _native.weight_chance(list(shape), granularity)


def orth_loss(experts, granularity: str = "flat", variant: str = "normalized") -> Tuple[float, np.ndarray]:
    """The orthogonality loss and its gradient, as moescope's trainer computes them.

    With u_e^(s) the slices of ``granularity`` (see ``weight_overlap``),

        L = (1/S) Σ_s Σ_{i<j} φ(u_i^(s), u_j^(s))

    where φ is cos² for ``normalized`` (the gradient flows through the norms)
    and ``detached_norm`` (the norms are held constant in the gradient), and
    ⟨u_i, u_j⟩² for ``unnormalized``. Returns ``(L, dL/dW)`` with the gradient
    in the shape and dtype of ``experts``; it is not scaled by any λ.
    """
    return _native.orth_loss(_experts(experts), granularity, variant)


def activation_overlap(outputs, selected) -> Dict[str, Any]:
    """Activation overlap: how alike the experts' outputs are on the same token.

    ``outputs``: either an (n, E, d) array of every expert's output on every
    token, or a list of E arrays, expert e's of shape (n_e, d) holding its
    outputs on the tokens routed to it, in token order. ``selected``: (n, k)
    expert indices per token (−1 for an empty slot; for soft routing, every
    expert: ``np.tile(np.arange(E), (n, 1))``).

    Per token x with m ≥ 2 routed experts S(x):
        MSO_act(x) = 2 / (m(m−1)) · Σ_{i<j ∈ S(x)} cos²(h_i(x), h_j(x))

    Returns a dict: ``act_mso`` (mean over tokens with m ≥ 2; None with the
    reason in ``act_mso_null_reason``, e.g. for top-1 routing),
    ``act_mso_all`` (all E(E−1)/2 pairs on every token; only from (n, E, d)
    outputs, None otherwise), ``act_overlap`` (E×E mean cos² per co-routed
    pair, NaN where a pair never met), ``tokens`` and ``chance`` = 1/d.
    Outputs are compared in float32 with float64 sums.
    """
    sel = _selection(selected)
    if isinstance(outputs, (list, tuple)):
        outs = [_as_array(o, f"outputs[{i}]") for i, o in enumerate(outputs)]
        dense = False
    else:
        outs = [_as_array(outputs, "outputs")]
        dense = True
    r = json.loads(_native.activation_overlap(outs, dense, sel))
    r["act_overlap"] = _matrix(r["act_overlap"])
    return r


def routing_telemetry(routing, n_experts: Optional[int] = None, k: Optional[int] = None) -> Dict[str, Any]:
    """Routing telemetry of one layer.

    ``routing``: either integer expert indices of shape (n, k) (−1 for an
    empty slot), or float router probabilities of shape (n, E); with
    probabilities each token's experts are its ``k`` most probable (``k`` is
    then required) and the router entropy is reported.

    Returns ``load`` (tokens per expert), ``fraction`` (load/Σload),
    ``router_entropy`` (mean over tokens of −Σ_e p_e ln p_e, nats; None
    without probabilities), ``load_entropy`` (H(fraction)), ``balance``
    (exp(load_entropy)/E), ``dead_experts``, ``max_violation``
    (max load/mean load − 1), ``tokens``, and ``chance``: a router that knows
    nothing has router entropy ln E; uniform random selection gives balance
    → 1 and max_violation → 0.
    """
    if hasattr(routing, "detach"):  # a torch tensor
        is_probs = bool(routing.is_floating_point())
    else:
        is_probs = np.issubdtype(np.asarray(routing).dtype, np.floating)
    if is_probs:
        p = _probabilities(routing, "routing")
        if k is None:
            raise ValueError("k: required with router probabilities (each token's k most probable experts are its selection)")
        if not 1 <= k <= p.shape[1]:
            raise ValueError(f"k: expected 1 ≤ k ≤ E = {p.shape[1]}, got {k}")
        if n_experts is not None and n_experts != p.shape[1]:
            raise ValueError(f"n_experts: {n_experts}, but routing has {p.shape[1]} columns")
        # Stable sort: ties go to the lower index, as moescope's router does.
        sel = np.argsort(-p, axis=1, kind="stable")[:, :k].astype(np.int64)
        return json.loads(_native.routing_telemetry(sel, p.shape[1], p))
    sel = _selection(routing, "routing")
    if n_experts is None:
        raise ValueError("n_experts: required with expert indices (experts that got no token count too)")
    return json.loads(_native.routing_telemetry(sel, n_experts, None))


def jacobian_alignment(
    w_up,
    w_down,
    x,
    selected,
    w_gate=None,
    activation: str = "silu",
    mode: str = "exact",
    *,
    b_up=None,
    b_down=None,
    pairs: str = "all",
    probs=None,
    seed: int = 0,
    spectra_tokens: int = 16,
    null_draws: int = 20,
    null_init_tokens: int = 256,
    precision: str = "f32",
) -> Dict[str, Any]:
    """Cross-expert Jacobian alignment of one MoE layer.

    Expert e computes f_e(x) = W_down,e φ(W_up,e x + b_up,e) + b_down,e (with
    ``w_gate``: W_down,e (silu(W_gate,e x) ⊙ W_up,e x)); its Jacobian at the
    token x is J_e(x) = ∂f_e/∂x (d × d). Two experts are compared on the
    same token by

        A_ij(x) = ⟨J_i(x), J_j(x)⟩_F / (‖J_i(x)‖_F ‖J_j(x)‖_F)

    over all pairs on every token (``pairs="all"``, the default, which also
    gives the three pair sets and the shuffled-routing null) or only the
    routed pairs of each token (``"routed"``: i < j both in ``selected[t]``).
    ``mode``: ``exact`` (from the Jacobians' factors), ``estimate`` or
    ``estimate:M`` (Hutchinson probes, M = 64 by default, with a standard
    error), ``auto`` (exact unless it costs more). ``activation`` is
    ``silu`` or ``gelu`` (tanh approximation); gated experts use silu.

    Chance levels (``null``): ``shuffled_routing`` (``null_draws`` draws of
    the routing shuffled across tokens; needs ``pairs="all"``) and
    ``random_init`` (independently initialised experts of the same shapes on
    the first ``null_init_tokens`` tokens); for reference E[A²] = 1/d² for
    a rotation-invariant random J_j. ``probs`` (n, E) are the router's
    probabilities, used for the ``gate_weighted`` pair set (uniform when not
    given). ``spectra_tokens``: routed tokens per expert whose explicit
    Jacobian's singular values give ``spectra`` and ``effective_rank``.
    ``seed`` seeds the probes and the nulls. The defaults are those of
    ``moescope analyze``.

    Shapes (torch ``nn.Linear`` weight layout): w_up and w_gate (E, d_ff, d),
    w_down (E, d, d_ff), b_up (E, d_ff), b_down (E, d), x (n, d), selected
    (n, k). Returns the dict ``moescope analyze`` writes per layer under
    ``jacobian``: ``mean``, ``mean_abs``, ``mean_sq`` of A, the E×E ``matrix``
    (NaN where undefined), ``sets``, ``null`` (chance levels), ``spectra``
    and ``effective_rank``. ``precision``: ``f32`` (float32 products with
    float64 sums, as ``moescope analyze`` by default; within 1e-5 of the
    reference) or ``f64`` (the float64 reference, slower).
    """
    r = json.loads(
        _native.jacobian_alignment(
            _experts(w_up, "w_up"),
            _experts(w_down, "w_down"),
            _as_array(x, "x"),
            _selection(selected),
            None if w_gate is None else _experts(w_gate, "w_gate"),
            None if b_up is None else _as_array(b_up, "b_up"),
            None if b_down is None else _as_array(b_down, "b_down"),
            activation,
            mode,
            pairs,
            None if probs is None else _probabilities(probs),
            seed,
            spectra_tokens,
            null_draws,
            null_init_tokens,
            precision,
        )
    )
    r["matrix"] = _matrix(r["matrix"])
    return r


def subspaces(rows_per_expert, rank: Union[int, str] = 16, weights=None) -> Dict[str, Any]:
    """Expert subspaces: the PCA subspace of the rows routed to each expert.

    ``rows_per_expert``: E arrays of shape (n_e, d) (e.g. each expert's
    routed inputs); ``weights``: optional E arrays (n_e,) of row weights
    (e.g. gates). ``rank``: a fixed rank r, or ``"var:τ"`` (the smallest rank
    reaching a fraction τ of the variance, capped at 16; ``"var:τ:CAP"``).
    An expert with at most ``rank`` (or CAP) rows is skipped.

    For experts i, j with orthonormal bases U_i, U_j (d × r), the principal
    angles are θ_k = arccos σ_k(U_iᵀ U_j). Returns ``principal_angles``
    (E×E lists of angles in radians, None on the diagonal and for skipped
    experts), ``overlap`` (mean cos²θ, = ‖U_iᵀU_j‖²_F / r), ``geodesic``
    (‖θ‖₂), ``geodesic_normalised`` (‖θ‖₂ / (π/2 · √r)), ``mean_overlap``,
    ``random_overlap`` = r/d (the chance level: the expected overlap of
    random r-dimensional subspaces of ℝᵈ), ``rank``, ``effective_rank``,
    ``skipped``. Matrices are float64 arrays with NaN where undefined.
    """
    rows = [_as_array(r, f"rows_per_expert[{i}]") for i, r in enumerate(rows_per_expert)]
    w = None if weights is None else [_as_array(x, f"weights[{i}]") for i, x in enumerate(weights)]
    r = json.loads(_native.subspaces(rows, str(rank), w))
    for key in ("overlap", "geodesic", "geodesic_normalised"):
        r[key] = _matrix(r[key])
    return r


def analyze(model: Union[str, os.PathLike], **options) -> Dict[str, Any]:
    """Every measure on a model: what ``moescope analyze --model MODEL`` writes.

    ``model``: a moescope run folder or model.safetensors, a Hugging Face
    model folder (config.json + safetensors), or a hub id ``org/name``
    (downloaded when online). ``options`` are the command's flags with ``_``
    for ``-``: ``tokens``, ``data``, ``token_ids``, ``layers``, ``seq_len``,
    ``families``, ``batch``, ``jacobian``, ``jacobian_pairs``,
    ``jacobian_tokens``, ``jacobian_precision``, ``spectra_tokens``, ``subspace``, ``space``,
    ``weighted``, ``null_draws``, ``null_tokens``, ``act_space``,
    ``granularity``, ``device``, ``revision``, ``in_memory``, and
    ``progress`` (progress bars on stderr; off by default). Lists may be
    Python lists or comma-separated strings. Returns the report (schema
    ``moescope.analysis/1``) as a dict. Error messages name the command's
    flag (``--token-ids`` for ``token_ids``).
    """
    opts = {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()}
    return json.loads(_native.analyze(os.fspath(model), json.dumps(opts)))


class Run(list):
    """A run's ``metrics.jsonl`` rows (dicts), with the run's folder and summary.

    ``.frame()`` gives the rows as a pandas DataFrame (pandas must be installed).
    """

    def __init__(self, rows: List[Dict[str, Any]], path: str, summary: Optional[Dict[str, Any]]):
        super().__init__(rows)
        self.path = path
        self.summary = summary

    def frame(self, kind: Optional[str] = None):
        """The rows as a pandas DataFrame; ``kind`` keeps one kind of row (e.g. ``"eval"``)."""
        try:
            import pandas as pd
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("Run.frame() needs pandas: pip install pandas") from e
        rows = [r for r in self if kind is None or r.get("kind") == kind]
        return pd.DataFrame(rows)


def load_run(run_dir: Union[str, os.PathLike]) -> Run:
    """The metrics of a moescope run folder (``metrics.jsonl``), checked line by line."""
    d = os.fspath(run_dir)
    rows = json.loads(_native.read_metrics(os.path.join(d, "metrics.jsonl")))
    summary = None
    path = os.path.join(d, "summary.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    return Run(rows, d, summary)
