#!/usr/bin/env python3
"""Compare moescope's forward pass of Hugging Face MoE checkpoints with
transformers' own, on tiny random models of each supported model_type.

For each type: build a random model with transformers, save it with
save_pretrained (safetensors), compute the next-token loss and the router's
expert loads on random token ids, then run `moescope analyze` on the saved
folder and the same ids and compare. Prints one JSON line per type and exits
non-zero if any loss differs by more than --tol (relative).

Needs torch and transformers (outside the repo, never in CI):
    python3 -m venv /tmp/hf-venv && /tmp/hf-venv/bin/pip install torch transformers
    /tmp/hf-venv/bin/python scripts/compare_transformers.py --moescope target/release/moescope
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers as tf

COMMON = dict(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
              tie_word_embeddings=False)


def configs():
    yield "mixtral", tf.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                      num_experts_per_tok=2, sliding_window=7)
    yield "qwen2_moe", tf.Qwen2MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=False,
                                         decoder_sparse_step=1, mlp_only_layers=[1])
    yield "qwen3_moe", tf.Qwen3MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=32,
                                         num_experts=6, num_experts_per_tok=2, head_dim=24,
                                         norm_topk_prob=True, decoder_sparse_step=1,
                                         mlp_only_layers=[0])
    yield "olmoe", tf.OlmoeConfig(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=32,
                                  num_experts=6, num_experts_per_tok=3, norm_topk_prob=False,
                                  clip_qkv=3.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moescope", default="target/release/moescope")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = ap.parse_args()
    torch.manual_seed(0)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in configs():
            cfg.attn_implementation = "eager"
            model = tf.AutoModelForCausalLM.from_config(cfg).eval()
            # Wider weights than the default init so routing is not uniform.
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() >= 2:
                        p.normal_(0, 0.1)
            model = model.to(getattr(torch, a.dtype))
            d = os.path.join(tmp, name)
            model.save_pretrained(d, safe_serialization=True)
            # The reference: transformers reading the saved checkpoint, computing in f32
            # (upcasting the live model would also round RoPE's inv_freq buffer to bf16).
            model = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
            ids = torch.randint(0, cfg.vocab_size, (1, a.tokens + 1))
            with torch.no_grad():
                out = model(ids[:, :-1], labels=ids[:, :-1].clone(), output_router_logits=True)
                logits = out.logits[0]
                loss = torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:]).item()
            with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                json.dump(ids[0].tolist(), f)
            report = os.path.join(tmp, f"{name}-report.json")
            r = subprocess.run([a.moescope, "analyze", "--model", d, "--token-ids",
                                os.path.join(tmp, f"{name}.json"), "--tokens", str(a.tokens),
                                "--seq-len", str(a.tokens), "--jacobian", "off", "--subspace", "off",
                                "--out", report], capture_output=True, text=True)
            if r.returncode != 0:
                print(json.dumps({"model_type": name, "error": r.stderr.strip()[-400:]}))
                bad += 1
                continue
            rep = json.load(open(report))
            ours = rep["perplexity"]["loss"]
            rel = abs(ours - loss) / abs(loss)
            # Router loads from transformers' router logits (softmax, top-k, lower index on ties).
            loads_ok = True
            moe_layers = [l["index"] for l in rep["layers"]]
            rl = [x for x in out.router_logits if x is not None]
            for layer, logits_l in zip(rep["layers"], rl):
                k = cfg.num_experts_per_tok
                sel = torch.softmax(logits_l.float(), -1).topk(k, -1).indices
                counts = torch.bincount(sel.flatten(), minlength=logits_l.shape[-1]).tolist()
                loads_ok &= counts == layer["load"]
            ok = rel < a.tol and loads_ok
            bad += not ok
            print(json.dumps({"model_type": name, "dtype": a.dtype, "tokens": a.tokens,
                              "loss_transformers": loss, "loss_moescope": ours,
                              "rel_diff": rel, "moe_layers": moe_layers,
                              "router_loads_equal": loads_ok, "ok": ok}))
    print(f"transformers {tf.__version__}, torch {torch.__version__}", file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
