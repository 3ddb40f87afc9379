"""Each function against a float64 reference written here in numpy loops,
on random inputs, in both precisions."""

import itertools
import math

import numpy as np
import pytest

import moescope

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------- references


def ref_cos2(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = a @ a, b @ b
    return 0.0 if na == 0 or nb == 0 else (a @ b) ** 2 / (na * nb)


def ref_slices(w, granularity):
    """Expert matrix (R, C) cut into the slices of a granularity."""
    if granularity == "flat":
        return [w.ravel()]
    if granularity == "rows":
        return list(w)
    return list(w.T)


def ref_weight_mso(experts, granularity):
    e = len(experts)
    pairs = list(itertools.combinations(range(e), 2))
    total = 0.0
    for i, j in pairs:
        si, sj = ref_slices(experts[i], granularity), ref_slices(experts[j], granularity)
        total += np.mean([ref_cos2(a, b) for a, b in zip(si, sj)])
    return total / len(pairs)


def ref_orth_loss(experts, granularity, variant):
    total = 0.0
    slices = [ref_slices(w, granularity) for w in experts]
    s = len(slices[0])
    for i, j in itertools.combinations(range(len(experts)), 2):
        for a, b in zip(slices[i], slices[j]):
            if variant == "unnormalized":
                total += float(a @ b) ** 2
            else:
                total += ref_cos2(a, b)
    return total / s


def ref_act(outputs, selected):
    """Routed MSO, all-pair MSO and the co-routed pair matrix of (n, E, d) outputs."""
    n, e, _ = outputs.shape
    routed, all_pairs = [], []
    psum, pcount = np.zeros((e, e)), np.zeros((e, e))
    for t in range(n):
        s = [x for x in selected[t] if x >= 0]
        if len(s) >= 2:
            vals = []
            for a, b in itertools.combinations(s, 2):
                c = ref_cos2(outputs[t, a], outputs[t, b])
                vals.append(c)
                lo, hi = min(a, b), max(a, b)
                psum[lo, hi] += c
                pcount[lo, hi] += 1
            routed.append(np.mean(vals))
        all_pairs.append(np.mean([ref_cos2(outputs[t, a], outputs[t, b]) for a, b in itertools.combinations(range(e), 2)]))
    m = np.full((e, e), np.nan)
    for i in range(e):
        for j in range(e):
            lo, hi = min(i, j), max(i, j)
            if i != j and pcount[lo, hi] > 0:
                m[i, j] = psum[lo, hi] / pcount[lo, hi]
    return (np.mean(routed) if routed else None), np.mean(all_pairs), m


def silu(z):
    return z / (1 + np.exp(-z))


def dsilu(z):
    s = 1 / (1 + np.exp(-z))
    return s * (1 + z * (1 - s))


def ref_jacobian(w_up, w_down, x, w_gate=None, b_up=None):
    z = w_up @ x + (0 if b_up is None else b_up)
    if w_gate is None:
        return w_down @ (dsilu(z)[:, None] * w_up)
    g = w_gate @ x
    u = w_up @ x
    return w_down @ ((dsilu(g) * u)[:, None] * w_gate + silu(g)[:, None] * w_up)


def ref_subspace_basis(rows, r, weights=None):
    w = np.ones(len(rows)) if weights is None else np.asarray(weights, np.float64)
    mu = (w[:, None] * rows).sum(0) / w.sum()
    c = ((rows - mu).T * w) @ (rows - mu) / w.sum()
    vals, vecs = np.linalg.eigh(c)
    return vecs[:, np.argsort(vals)[::-1][:r]]


# ---------------------------------------------------------------- weight overlap


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("granularity", ["flat", "rows", "cols"])
def test_weight_overlap_matches_loops(dtype, granularity):
    experts = RNG.standard_normal((5, 12, 7)).astype(dtype)
    experts[1] += 0.8 * experts[0]  # one aligned pair, far from chance
    matrix, mso = moescope.weight_overlap(experts, granularity)
    assert mso == pytest.approx(ref_weight_mso(experts.astype(np.float64), granularity), rel=1e-5)
    for i, j in itertools.combinations(range(5), 2):
        if granularity == "flat":
            a, b = experts[i].ravel().astype(np.float64), experts[j].ravel().astype(np.float64)
            want = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        else:
            want = ref_weight_mso(experts[[i, j]].astype(np.float64), granularity)
        assert matrix[i, j] == pytest.approx(want, rel=1e-5, abs=1e-9)
        assert matrix[j, i] == matrix[i, j]
    assert np.allclose(np.diag(matrix), 1.0)


def test_weight_overlap_takes_lists_and_flat_vectors_and_reports_chance():
    experts = RNG.standard_normal((4, 6, 5))
    by_list = moescope.weight_overlap([e for e in experts])
    by_vectors = moescope.weight_overlap(experts.reshape(4, 30))
    assert by_list.mso == pytest.approx(by_vectors.mso, rel=1e-12)
    assert by_list.chance == pytest.approx(1 / 30)
    assert moescope.weight_overlap(experts, "rows").chance == pytest.approx(1 / 5)
    assert moescope.weight_overlap(experts, "cols").chance == pytest.approx(1 / 6)


def test_random_experts_sit_at_the_chance_level():
    """The README's check: 8 random 64×32 experts give about 1/2048."""
    mso = moescope.weight_overlap(np.random.default_rng(0).standard_normal((8, 64, 32)))[1]
    assert 0.5 / 2048 < mso < 2.0 / 2048


def test_weight_overlap_refuses_bad_shapes_naming_the_argument():
    with pytest.raises(ValueError, match=r"experts: expected an array of shape \(E, P\) or \(E, R, C\)"):
        moescope.weight_overlap(np.zeros(5))
    with pytest.raises(ValueError, match="granularity `rows` cuts matrices"):
        moescope.weight_overlap(np.ones((3, 10)), "rows")
    with pytest.raises(ValueError, match="unknown granularity `diag`"):
        moescope.weight_overlap(np.ones((3, 4, 4)), "diag")


# ---------------------------------------------------------------- orthogonality loss


def numeric_grad(f, w, h=1e-6):
    g = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        old = w[idx]
        w[idx] = old + h
        up = f(w)
        w[idx] = old - h
        down = f(w)
        w[idx] = old
        g[idx] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("granularity", ["flat", "rows", "cols"])
@pytest.mark.parametrize("variant", ["normalized", "unnormalized"])
def test_orth_loss_value_and_gradient(granularity, variant):
    w = RNG.standard_normal((3, 4, 5))
    value, grad = moescope.orth_loss(w, granularity, variant)
    assert value == pytest.approx(ref_orth_loss(w, granularity, variant), rel=1e-9)
    num = numeric_grad(lambda x: ref_orth_loss(x, granularity, variant), w.copy())
    assert grad.shape == w.shape and grad.dtype == np.float64
    assert np.allclose(grad, num, rtol=1e-5, atol=1e-7)


def test_orth_loss_detached_norm_holds_the_norms_constant():
    w = RNG.standard_normal((3, 4, 5))
    norms = np.linalg.norm(w.reshape(3, -1), axis=1)

    def frozen(x):
        v = x.reshape(3, -1)
        return sum((v[i] @ v[j]) ** 2 / (norms[i] ** 2 * norms[j] ** 2) for i, j in itertools.combinations(range(3), 2))

    value, grad = moescope.orth_loss(w, "flat", "detached_norm")
    assert value == pytest.approx(ref_orth_loss(w, "flat", "normalized"), rel=1e-9)
    assert np.allclose(grad, numeric_grad(frozen, w.copy()), rtol=1e-5, atol=1e-7)


def test_orth_loss_in_float32_agrees_with_float64():
    w = RNG.standard_normal((4, 8, 8))
    v32, g32 = moescope.orth_loss(w.astype(np.float32))
    v64, g64 = moescope.orth_loss(w)
    assert g32.dtype == np.float32
    assert v32 == pytest.approx(v64, rel=1e-5)
    assert np.allclose(g32, g64, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- activation overlap


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_overlap_dense_matches_loops(dtype):
    n, e, d, k = 40, 5, 6, 2
    outputs = RNG.standard_normal((n, e, d)).astype(dtype)
    outputs[:, 1] += 2.0 * outputs[:, 0]
    selected = np.array([RNG.choice(e, size=k, replace=False) for _ in range(n)])
    r = moescope.activation_overlap(outputs, selected)
    routed, all_pairs, matrix = ref_act(outputs.astype(np.float64), selected)
    assert r["act_mso"] == pytest.approx(routed, rel=1e-5)
    assert r["act_mso_all"] == pytest.approx(all_pairs, rel=1e-5)
    assert np.allclose(r["act_overlap"], matrix, rtol=1e-5, equal_nan=True)
    assert r["chance"] == pytest.approx(1 / d) and r["tokens"] == n


def test_activation_overlap_from_routed_rows_equals_the_dense_form():
    n, e, d = 30, 4, 5
    outputs = RNG.standard_normal((n, e, d))
    selected = np.array([RNG.choice(e, size=2, replace=False) for _ in range(n)])
    rows = [outputs[[t for t in range(n) if x in selected[t]], x] for x in range(e)]
    dense = moescope.activation_overlap(outputs, selected)
    routed = moescope.activation_overlap(rows, selected)
    assert routed["act_mso"] == pytest.approx(dense["act_mso"], rel=1e-6)
    assert routed["act_mso_all"] is None
    with pytest.raises(ValueError, match=r"outputs\[0\]: expected shape \(\d+, 5\)"):
        moescope.activation_overlap([r[:-1] for r in rows], selected)


def test_top1_has_no_routed_pairs_but_all_pairs_are_defined():
    outputs = RNG.standard_normal((10, 3, 4))
    r = moescope.activation_overlap(outputs, np.arange(10)[:, None] % 3)
    assert r["act_mso"] is None and "k = 1" in r["act_mso_null_reason"]
    assert r["act_mso_all"] == pytest.approx(ref_act(outputs, np.zeros((10, 1), int))[1], rel=1e-5)


def test_soft_routing_routes_every_pair():
    outputs = RNG.standard_normal((12, 4, 3))
    every = np.tile(np.arange(4), (12, 1))
    r = moescope.activation_overlap(outputs, every)
    assert r["act_mso"] == pytest.approx(r["act_mso_all"], rel=1e-9)


def test_selection_errors_name_the_cell():
    with pytest.raises(ValueError, match=r"selected\[1, 0\] = 7: not an expert index in 0..3"):
        moescope.activation_overlap(np.zeros((2, 3, 4)), np.array([[0, 1], [7, 1]]))
    with pytest.raises(ValueError, match=r"selected\[0\]: expert 1 is listed twice"):
        moescope.activation_overlap(np.zeros((1, 3, 4)), np.array([[1, 1]]))


# ---------------------------------------------------------------- routing telemetry


def test_routing_telemetry_of_a_selection():
    selected = np.array([[0, 1], [0, 2], [0, 1], [1, -1]])
    t = moescope.routing_telemetry(selected, n_experts=4)
    assert t["load"] == [3, 3, 1, 0]
    frac = np.array([3, 3, 1, 0]) / 7
    h = -sum(p * math.log(p) for p in frac if p > 0)
    assert t["load_entropy"] == pytest.approx(h)
    assert t["balance"] == pytest.approx(math.exp(h) / 4)
    assert t["dead_experts"] == [3]
    assert t["max_violation"] == pytest.approx(3 / (7 / 4) - 1)
    assert t["router_entropy"] is None
    assert t["chance"]["router_entropy"] == pytest.approx(math.log(4))


def test_routing_telemetry_of_probabilities():
    logits = RNG.standard_normal((50, 6))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    t = moescope.routing_telemetry(p, k=2)
    want_h = np.mean(-(p * np.log(p)).sum(1))
    assert t["router_entropy"] == pytest.approx(want_h, rel=1e-6)
    top2 = np.argsort(-p, axis=1)[:, :2]
    assert t["load"] == [int((top2 == e).sum()) for e in range(6)]
    with pytest.raises(ValueError, match="k: required"):
        moescope.routing_telemetry(p)


# ---------------------------------------------------------------- Jacobian alignment


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("precision,rel", [("f64", 1e-9), ("f32", 1e-5)])
def test_jacobian_alignment_exact_matches_explicit_jacobians(gated, precision, rel):
    e, f, d, n = 4, 6, 5, 12
    w_up = RNG.standard_normal((e, f, d)) / math.sqrt(d)
    w_down = RNG.standard_normal((e, d, f)) / math.sqrt(f)
    w_gate = RNG.standard_normal((e, f, d)) / math.sqrt(d) if gated else None
    b_up = None if gated else RNG.standard_normal((e, f)) * 0.1
    x = RNG.standard_normal((n, d))
    selected = np.array([RNG.choice(e, size=2, replace=False) for _ in range(n)])
    r = moescope.jacobian_alignment(
        w_up, w_down, x, selected, w_gate=w_gate, b_up=b_up, mode="exact", pairs="routed", precision=precision
    )
    values = []
    for t in range(n):
        i, j = selected[t]
        ji = ref_jacobian(w_up[i], w_down[i], x[t], None if w_gate is None else w_gate[i], None if b_up is None else b_up[i])
        jj = ref_jacobian(w_up[j], w_down[j], x[t], None if w_gate is None else w_gate[j], None if b_up is None else b_up[j])
        values.append((ji * jj).sum() / np.linalg.norm(ji) / np.linalg.norm(jj))
    assert r["mode"] == "exact" and r["instances"] == n
    assert r["mean"] == pytest.approx(np.mean(values), rel=rel)
    assert r["mean_sq"] == pytest.approx(np.mean(np.square(values)), rel=rel)


def test_jacobian_alignment_estimate_is_close_to_exact():
    e, f, d, n = 3, 8, 6, 10
    w_up = RNG.standard_normal((e, f, d))
    w_down = RNG.standard_normal((e, d, f))
    w_down[1] = w_down[0]
    w_up[1] = w_up[0] + 0.1 * w_up[1]
    x = RNG.standard_normal((n, d))
    selected = np.tile([0, 1], (n, 1))
    exact = moescope.jacobian_alignment(w_up, w_down, x, selected, mode="exact", pairs="routed")
    est = moescope.jacobian_alignment(w_up, w_down, x, selected, mode="estimate:512", pairs="routed")
    assert est["mode"] == "estimate"
    assert abs(est["mean"] - exact["mean"]) < 5 * est["stderr"] + 0.02


def test_jacobian_alignment_shape_errors():
    with pytest.raises(ValueError, match=r"w_down: expected shape \(E, d, d_ff\) = \[2, 3, 4\]"):
        moescope.jacobian_alignment(np.zeros((2, 4, 3)), np.zeros((2, 4, 3)), np.zeros((1, 3)), np.array([[0, 1]]))


# ---------------------------------------------------------------- subspaces


@pytest.mark.parametrize("weighted", [False, True])
def test_subspaces_match_numpy_pca(weighted):
    d, r = 8, 3
    rows = [RNG.standard_normal((40, d)) @ np.diag(np.linspace(3, 0.2, d)) for _ in range(3)]
    rows[1] = rows[0] + 0.05 * RNG.standard_normal((40, d))
    weights = [RNG.uniform(0.1, 1, 40) for _ in range(3)] if weighted else None
    s = moescope.subspaces(rows, rank=r, weights=weights)
    bases = [ref_subspace_basis(x, r, None if weights is None else weights[i]) for i, x in enumerate(rows)]
    for i, j in itertools.combinations(range(3), 2):
        sv = np.clip(np.linalg.svd(bases[i].T @ bases[j], compute_uv=False), 0, 1)
        angles = np.sort(np.arccos(sv))
        assert np.allclose(np.sort(s["principal_angles"][i][j]), angles, atol=1e-6)
        assert s["overlap"][i, j] == pytest.approx(np.mean(np.cos(angles) ** 2), rel=1e-6)
        assert s["geodesic"][i, j] == pytest.approx(np.linalg.norm(angles), rel=1e-6, abs=1e-9)
    assert s["random_overlap"] == pytest.approx(r / d)
    assert s["rank"] == [r, r, r]


def test_subspaces_skip_experts_with_too_few_rows():
    rows = [RNG.standard_normal((30, 6)), RNG.standard_normal((30, 6)), RNG.standard_normal((2, 6))]
    s = moescope.subspaces(rows, rank="var:0.9")
    assert s["skipped"] == [{"expert": 2, "n": 2}]
    assert s["principal_angles"][0][2] is None
    assert np.isnan(s["overlap"][0, 2])


def gelu(z):
    return 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def test_jacobian_alignment_over_all_pairs_with_gelu_and_float32():
    e, f, d, n = 3, 5, 4, 6
    w_up = RNG.standard_normal((e, f, d)).astype(np.float32)
    w_down = RNG.standard_normal((e, d, f)).astype(np.float32)
    x = RNG.standard_normal((n, d)).astype(np.float32)
    selected = np.array([RNG.choice(e, size=2, replace=False) for _ in range(n)])
    r = moescope.jacobian_alignment(w_up, w_down, x, selected, activation="gelu", null_init_tokens=4)

    def jac(i, t):
        z = w_up[i].astype(np.float64) @ x[t].astype(np.float64)
        h = 1e-6
        dgelu = (gelu(z + h) - gelu(z - h)) / (2 * h)
        return w_down[i].astype(np.float64) @ (dgelu[:, None] * w_up[i].astype(np.float64))

    values = [
        (jac(i, t) * jac(j, t)).sum() / np.linalg.norm(jac(i, t)) / np.linalg.norm(jac(j, t))
        for t in range(n)
        for i, j in itertools.combinations(range(e), 2)
    ]
    assert r["pairs"] == "all" and r["instances"] == n * 3
    assert r["mean"] == pytest.approx(np.mean(values), rel=1e-6)
    assert r["sets"]["all"]["mean"] == pytest.approx(np.mean(values), rel=1e-6)
    assert r["null"]["random_init"] is not None and r["null"]["shuffled_routing"] is not None
    with pytest.raises(ValueError, match="gated .* use silu"):
        moescope.jacobian_alignment(w_up, w_down, x, selected, w_gate=w_up, activation="gelu")


def test_an_empty_slot_leaves_a_token_with_one_expert_out():
    outputs = RNG.standard_normal((3, 3, 4))
    selected = np.array([[0, 1], [2, -1], [1, 2]])
    r = moescope.activation_overlap(outputs, selected)
    want = np.mean([ref_cos2(outputs[0, 0], outputs[0, 1]), ref_cos2(outputs[2, 1], outputs[2, 2])])
    assert r["act_mso"] == pytest.approx(want, rel=1e-5)
    assert moescope.routing_telemetry(selected, n_experts=3)["load"] == [1, 2, 2]


def test_subspaces_with_fewer_rows_than_dimensions_and_an_empty_expert():
    d, r = 20, 3
    rows = [np.zeros((0, d))] + [RNG.standard_normal((10, d)) for _ in range(3)]
    s = moescope.subspaces(rows, rank=r)
    assert s["skipped"] == [{"expert": 0, "n": 0}]
    bases = [None] + [ref_subspace_basis(x, r) for x in rows[1:]]
    for i, j in itertools.combinations(range(1, 4), 2):
        sv = np.clip(np.linalg.svd(bases[i].T @ bases[j], compute_uv=False), 0, 1)
        assert s["overlap"][i, j] == pytest.approx(np.mean(sv**2), rel=1e-6)
