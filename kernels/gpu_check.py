"""
The two Python steps of kernels/gpu_check.sh:

    python kernels/gpu_check.py device                                      # versions and the device, for the record
    python kernels/gpu_check.py gpt2_folder OUT n_layer n_head n_embd n_positions   # a random GPT-2 in HF's layout
"""

import datetime
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import torch


def device():
    import triton
    print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print("torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__)
    for pkg in ("liger-kernel", "transformers", "safetensors"):
        try:
            print(pkg, importlib.metadata.version(pkg))
        except importlib.metadata.PackageNotFoundError:
            print(pkg, "not installed")
    if not torch.cuda.is_available():
        print("device: no CUDA (a dry run)")
        return
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "|", p.multi_processor_count, "SMs |", round(p.total_memory / 2**30), "GiB")
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                          "--format=csv"], capture_output=True, text=True).stdout)


def gpt2_folder(out, n_layer, n_head, n_embd, n_positions):
    """Random weights of GPT-2's architecture and GPT-2's tokenizer files from out/gpt2-vocab, as a Hugging Face
    folder: config.json, model.safetensors under GPT-2's names (Conv1D weights stored (in, out), as GPT-2 saves
    them; no lm_head.weight, it is tied to wte), vocab.json, merges.txt. Built here from shapes alone, so that
    kernels/ imports nothing from nanopost; nanopost.gpt2 reads the folder like a downloaded one."""
    from safetensors.torch import save_file

    os.makedirs(out)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join("out/gpt2-vocab", f), out)
    L, C, P, V = int(n_layer), int(n_embd), int(n_positions), 50257
    torch.manual_seed(0)
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(L):
        for name, shape in [("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
                            ("attn.c_attn.weight", (C, 3 * C)), ("attn.c_attn.bias", (3 * C,)),
                            ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                            ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                            ("mlp.c_fc.weight", (C, 4 * C)), ("mlp.c_fc.bias", (4 * C,)),
                            ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))]:
            shapes[f"h.{i}.{name}"] = shape
    # GPT-2's initialization (Radford et al. 2019): N(0, 0.02) matrices, zero biases, unit LayerNorm gains
    state = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            state[name] = torch.randn(shape) * 0.02
        else:
            state[name] = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    save_file(state, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dict(model_type="gpt2", n_positions=P, vocab_size=V, n_layer=L, n_head=int(n_head), n_embd=C), f)
    print(f"wrote {out}: GPT-2 {L} x {C}, {sum(t.numel() for t in state.values()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    dict(device=device, gpt2_folder=gpt2_folder)[sys.argv[1]](*sys.argv[2:])
