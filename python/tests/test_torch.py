"""The measures on a small PyTorch MoE defined here, against float64 references."""


import numpy as np
import pytest

import moescope
from test_measures import ref_act, ref_weight_mso

torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch to run this test)")


class TinyMoE(torch.nn.Module):
    """Top-2 MoE layer with SiLU MLP experts, as moescope's."""

    def __init__(self, d=16, f=32, e=4, k=2):
        super().__init__()
        self.k = k
        self.router = torch.nn.Linear(d, e, bias=False)
        self.up = torch.nn.ModuleList(torch.nn.Linear(d, f) for _ in range(e))
        self.down = torch.nn.ModuleList(torch.nn.Linear(f, d) for _ in range(e))

    def expert_outputs(self, x):
        return torch.stack([down(torch.nn.functional.silu(up(x))) for up, down in zip(self.up, self.down)], dim=1)

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        gates, selected = probs.topk(self.k, dim=-1)
        outs = self.expert_outputs(x)
        y = (outs.gather(1, selected[..., None].expand(-1, -1, outs.shape[-1])) * gates[..., None]).sum(1)
        return y, probs, selected, outs


def test_measures_of_a_torch_moe_match_float64_references():
    torch.manual_seed(0)
    moe = TinyMoE()
    x = torch.randn(64, 16)
    _, probs, selected, outs = moe(x)

    ups = [m.weight for m in moe.up]  # requires_grad tensors: detached on the way in
    matrix, mso = moescope.weight_overlap(ups)
    w = np.stack([u.detach().double().numpy() for u in ups])
    assert mso == pytest.approx(ref_weight_mso(w, "flat"), rel=1e-5)

    r = moescope.activation_overlap(outs, selected)
    routed, all_pairs, _ = ref_act(outs.detach().double().numpy(), selected.numpy())
    assert r["act_mso"] == pytest.approx(routed, rel=1e-5)
    assert r["act_mso_all"] == pytest.approx(all_pairs, rel=1e-5)

    t = moescope.routing_telemetry(probs, k=2)
    p = probs.detach().double().numpy()
    assert t["router_entropy"] == pytest.approx(np.mean(-(p * np.log(p)).sum(1)), rel=1e-5)

    jac = moescope.jacobian_alignment(
        torch.stack(ups), torch.stack([m.weight for m in moe.down]), x, selected,
        b_up=torch.stack([m.bias for m in moe.up]), mode="exact", pairs="routed",
    )
    values = []
    for t_ in range(8):
        i, j = selected[t_].tolist()
        ji = torch.autograd.functional.jacobian(lambda v: moe.down[i](torch.nn.functional.silu(moe.up[i](v))), x[t_])
        jj = torch.autograd.functional.jacobian(lambda v: moe.down[j](torch.nn.functional.silu(moe.up[j](v))), x[t_])
        values.append(float((ji * jj).sum() / ji.norm() / jj.norm()))
    first8 = moescope.jacobian_alignment(
        torch.stack(ups), torch.stack([m.weight for m in moe.down]), x[:8], selected[:8],
        b_up=torch.stack([m.bias for m in moe.up]), mode="exact", pairs="routed",
    )
    assert first8["mean"] == pytest.approx(np.mean(values), rel=1e-4)
    assert jac["instances"] == 64


def test_bfloat16_inputs_are_converted():
    w = torch.randn(4, 8, 8, dtype=torch.bfloat16)
    _, mso = moescope.weight_overlap(w)
    ref = ref_weight_mso(w.float().double().numpy(), "flat")
    assert mso == pytest.approx(ref, rel=1e-5)
